"""deploy/kubernetes/ validated offline (no cluster here): every Kubernetes object against the API's own JSON
schemas (kubernetes-validate, strict: unknown fields fail), the Istio DestinationRule against a schema of the
fields it uses (Istio's CRDs are not bundled), and the manifests against each other and the server's flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from loramux.deploy import haproxy_config as hc
from loramux.service import __main__ as service_main
from loramux.service.config import GENERATION_SERVICE
from loramux.service.routing import ADAPTER_KEY

FOLDER = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# grpc probes are GA from 1.27 (the oldest the manifests need); 1.37 is the newest kubernetes-validate knows.
VERSIONS = ("1.27.0", "1.37.0")
ISTIO_KINDS = {("networking.istio.io/v1", "DestinationRule")}


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}: {doc['kind']} {doc['metadata']['name']}", doc)
        for path in sorted(FOLDER.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


KUBERNETES = [(label, doc) for label, doc in documents() if (doc["apiVersion"], doc["kind"]) not in ISTIO_KINDS]


def test_every_file_has_objects():
    assert {p.name for p in FOLDER.glob("*.yaml")} == {"namespace.yaml", "replicas.yaml", "haproxy.yaml", "istio.yaml"}
    assert len(KUBERNETES) == 8


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("label", "doc"), KUBERNETES, ids=[label for label, _ in KUBERNETES])
def test_kubernetes_objects_validate(label, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_strict_validation_catches_a_typo():
    deployment = find("Deployment", "loramux")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


# The fields of networking.istio.io/v1 DestinationRule that istio.yaml uses (from Istio's API reference), closed
# with additionalProperties: false so that a misspelt field fails as kubernetes-validate's strict mode does.
DESTINATION_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "networking.istio.io/v1"},
        "kind": {"const": "DestinationRule"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
        },
        "spec": {
            "type": "object",
            "required": ["host"],
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string", "minLength": 1},
                "trafficPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "loadBalancer": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "consistentHash": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "minProperties": 1,
                                    "maxProperties": 1,
                                    "properties": {
                                        "httpHeaderName": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                                        "httpCookie": {"type": "object"},
                                        "useSourceIp": {"type": "boolean"},
                                        "httpQueryParameterName": {"type": "string"},
                                    },
                                },
                                "simple": {"enum": ["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM", "PASSTHROUGH"]},
                            },
                        }
                    },
                },
            },
        },
    },
}


def test_destination_rule_hashes_on_the_routing_key():
    rule = find("DestinationRule", "loramux-adapter-affinity")
    jsonschema.validate(rule, DESTINATION_RULE)
    assert rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] == ADAPTER_KEY
    mesh = find("Service", "loramux-mesh")
    assert rule["spec"]["host"] == f"loramux-mesh.{mesh['metadata']['namespace']}.svc.cluster.local"
    assert mesh["spec"].get("clusterIP") != "None"  # the sidecars balance a ClusterIP Service's calls
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**rule, "spec": {**rule["spec"], "trafficPolicies": {}}}, DESTINATION_RULE)


def container() -> dict[str, Any]:
    (only,) = find("Deployment", "loramux")["spec"]["template"]["spec"]["containers"]
    return only


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def test_replica_args_are_real_server_flags():
    args = container()["args"]
    parsed = service_main.build_parser().parse_args([a.replace("$(POD_NAME)", "loramux-0") for a in args])
    assert parsed.load_on_demand and parsed.replica_id == "loramux-0" and parsed.port == 50051
    assert parsed.adapter_root == [m["mountPath"] for m in container()["volumeMounts"] if m["name"] == "adapters"]
    assert [e["valueFrom"]["fieldRef"]["fieldPath"] for e in container()["env"] if e["name"] == "POD_NAME"] == [
        "metadata.name"
    ]


def test_termination_covers_drain_delay_and_grace_period():
    args = container()["args"]
    drain, grace = float(flag(args, "--drain-delay")), float(flag(args, "--grace-period"))
    pod = find("Deployment", "loramux")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= drain + grace + 1
    assert drain >= hc.Timing().detection_s  # HAProxy sees the replica go before it refuses new calls
    assert "lifecycle" not in container()  # no preStop: the drain delay runs inside the process


def test_probes_are_grpc_health_checks():
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": ports["grpc"], "service": GENERATION_SERVICE}
    assert c["livenessProbe"]["grpc"] == {"port": ports["grpc"]}  # "": the process
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


def test_haproxy_finds_the_replicas_through_the_headless_service():
    service = find("Service", "loramux-replicas")
    assert service["spec"]["clusterIP"] == "None"
    labels = find("Deployment", "loramux")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    fqdn = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    config = find("ConfigMap", "loramux-haproxy")["data"]["haproxy.cfg"]
    (grpc_port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert re.search(rf"server-template replica \d+ {re.escape(fqdn)}:{grpc_port} resolvers cluster_dns", config)
    assert "parse-resolv-conf" in config
    haproxy = find("Deployment", "loramux-haproxy")["spec"]["template"]["spec"]
    (mount,) = haproxy["containers"][0]["volumeMounts"]
    assert f"{mount['mountPath']}/haproxy.cfg" in haproxy["containers"][0]["args"]
    front = find("Service", "loramux")
    assert (
        front["spec"]["selector"].items()
        <= find("Deployment", "loramux-haproxy")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert all(d["metadata"].get("namespace", "loramux") == "loramux" for _, d in documents())
