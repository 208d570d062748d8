"""TLS and mutual TLS on the gRPC port (certificates made with the openssl CLI in tmp_path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from loramux.client import LoramuxClient, LoramuxRpcError
from loramux.client import cli as cli
from loramux.service import __main__ as service_main
from loramux.service.config import NetworkConfig, TlsFiles

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def tls_server(make_server, pki: Path, *, mutual: bool):
    files = TlsFiles(cert=pki / "server.pem", key=pki / "server.key", client_ca=pki / "ca.pem" if mutual else None)
    return make_server(network=NetworkConfig(host="127.0.0.1", port=0, tls=files))


def credentials(pki: Path, *, with_client_cert: bool) -> grpc.ChannelCredentials:
    ca = (pki / "ca.pem").read_bytes()
    if not with_client_cert:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    key, cert = (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def test_tls_serves_rpcs_and_health_and_refuses_plaintext(make_server, pki) -> None:
    server = tls_server(make_server, pki, mutual=False)
    with LoramuxClient(server.target, timeout=20, credentials=credentials(pki, with_client_cert=False)) as client:
        assert client.health("loramux.v1.GenerationService") == "SERVING"
        assert "".join(client.generate("Prove", max_new_tokens=3, ignore_eos=True))
    with LoramuxClient(server.target, timeout=5) as plain, pytest.raises(LoramuxRpcError) as caught:
        plain.list_adapters()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate(make_server, pki) -> None:
    server = tls_server(make_server, pki, mutual=True)
    with LoramuxClient(server.target, timeout=20, credentials=credentials(pki, with_client_cert=True)) as client:
        assert [a.name for a in client.list_adapters()] == ["math", "poet"]
    anonymous = credentials(pki, with_client_cert=False)
    with LoramuxClient(server.target, timeout=5, credentials=anonymous) as client, pytest.raises(LoramuxRpcError):
        client.list_adapters()


def test_cli_connects_with_tls(make_server, pki, capsys) -> None:
    server = tls_server(make_server, pki, mutual=False)
    argv = ["--target", server.target, "--timeout", "20", "--tls-ca-file", str(pki / "ca.pem"), "adapters", "list"]
    assert cli.main(argv) == 0
    assert "math" in capsys.readouterr().out


def test_tls_flags(pki) -> None:
    parse = service_main.build_parser().parse_args
    cert, key, ca = (str(pki / n) for n in ("server.pem", "server.key", "ca.pem"))
    config = service_main.config_from_args(parse(["--model", "m", "--tls-cert-file", cert, "--tls-key-file", key]), {})
    assert config.network.tls == TlsFiles(cert=Path(cert), key=Path(key))
    for argv, message in [
        (["--tls-cert-file", cert], "go together"),
        (["--tls-client-ca-file", ca], "needs --tls-cert-file"),
        (["--tls-cert-file", cert, "--tls-key-file", str(pki / "nope")], "TLS file not found"),
    ]:
        with pytest.raises(ValueError, match=message):
            service_main.config_from_args(parse(["--model", "m", *argv]), {})
