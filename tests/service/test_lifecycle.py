"""Start-up, health, reflection and graceful shutdown; `loramux-server` as a real subprocess."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import loramux.service.__main__ as service_main
from loramux.core import LinearKernel
from loramux.service.config import NetworkConfig
from loramux.service.server import HEALTH_NAMES
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb
from tests.service.harness import (
    build_engine,
    expect_failure,
    loop_thread,
    service_config,
    wait_until,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
Code = grpc.StatusCode
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
ROOT = Path(__file__).resolve().parents[2]


def test_health_serving_after_start(server):
    assert [server.health_status(name) for name in HEALTH_NAMES] == [SERVING] * 3
    with pytest.raises(grpc.RpcError) as caught:
        server.health_status("no.such.Service")
    assert caught.value.code() is Code.NOT_FOUND


def test_not_serving_while_the_model_loads(make_server, base_model, tokenizer, adapter_dirs):
    h = make_server(with_engine=False)
    assert [h.health_status(name) for name in HEALTH_NAMES] == [SERVING, NOT_SERVING, NOT_SERVING]
    failure = expect_failure(h.adapters.ListAdapters, apb.ListAdaptersRequest())
    assert failure.code is Code.UNAVAILABLE and failure.info.reason == "MODEL_LOADING"
    failure = expect_failure(h.generate, text="hi")
    assert failure.code is Code.UNAVAILABLE and failure.info.reason == "MODEL_LOADING"

    h.engine = build_engine(base_model, tokenizer, h.server.config, adapter_dirs, h.gate)
    loop_thread().run(h.server.attach(h.engine))
    assert [h.health_status(name) for name in HEALTH_NAMES] == [SERVING] * 3
    assert len(h.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters) == 2


def test_reflection_lists_every_service(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="loramux.v1.GenerationService"),
    ]
    listing, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listing.list_services_response.service}
    assert names == {
        "loramux.v1.AdapterService",
        "loramux.v1.GenerationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert described.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it without .proto


def test_grpc_options_use_the_real_channel_arg_names():
    keys = {k for k, _ in NetworkConfig().grpc_options()}
    assert keys == {
        "grpc.max_receive_message_length",
        "grpc.max_send_message_length",
        "grpc.keepalive_time_ms",
        "grpc.keepalive_timeout_ms",
        "grpc.keepalive_permit_without_calls",
        "grpc.http2.min_ping_interval_without_data_ms",  # not the silently ignored min_recv_... spelling
    }


def test_graceful_shutdown_lets_the_stream_finish_and_refuses_new_calls(server):
    watch = server.health.Watch(health_pb2.HealthCheckRequest(service="loramux.v1.GenerationService"))
    assert next(watch).status == SERVING
    request = gpb.GenerateRequest(text="Prove that", stopping=gpb.StoppingCriteria(max_new_tokens=20, ignore_eos=True))
    stream = server.generation.Generate(request, timeout=30)
    first = next(stream)
    server.gate.close()
    server.gate.held.wait(10)  # mid-generation

    stopping = loop_thread().spawn(server.server.shutdown(10.0))
    assert next(watch).status == NOT_SERVING
    watch.cancel()  # an open Watch stream would hold the shutdown for the whole grace period
    wait_until(lambda: not server.server.runtime.accepting, what="the server to stop accepting")
    with pytest.raises(grpc.RpcError) as caught:
        list(server.generation.Generate(gpb.GenerateRequest(text="new"), timeout=5))
    assert caught.value.code() is Code.UNAVAILABLE
    server.gate.open()

    rest = list(stream)  # the in-flight stream completes normally within the grace period
    assert first.HasField("chunk") and rest[-1].HasField("finished")
    assert rest[-1].finished.usage.completion_tokens == 20
    stopping.result(15)
    assert server.engine.running_rows == 0 and not server.engine._thread.is_alive()


def test_streams_past_the_grace_period_are_cut(server):
    request = gpb.GenerateRequest(text="Prove", stopping=gpb.StoppingCriteria(max_new_tokens=50, ignore_eos=True))
    stream = server.generation.Generate(request, timeout=30)
    next(stream)
    server.gate.close()
    server.gate.held.wait(10)
    stopping = loop_thread().spawn(server.server.shutdown(0.2))
    with pytest.raises(grpc.RpcError) as caught:
        list(stream)
    assert caught.value.code() is Code.UNAVAILABLE  # cut by the grpc library, as the contract says
    server.gate.open()
    stopping.result(15)
    assert server.engine.running_rows == 0


def test_no_model_and_no_demo_assets_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(service_main, "DEFAULT_MODEL_DIR", tmp_path / "missing" / "model")
    with pytest.raises(SystemExit) as caught:
        service_main.main(["--port", "0"])
    assert caught.value.code == 2
    assert "no --model given" in capsys.readouterr().err


def test_flags_make_one_frozen_config(adapter_dirs, tmp_path):
    flags = (
        "--max-batch-rows 4 --max-queued 8 --max-prompt-tokens 100 --max-total-tokens 200 --max-adapters 3"
        " --max-rank 16 --dtype float32 --device cpu --port 0 --grace-period 2.5 --max-message-mb 8"
        " --linear-kernel torch --no-ragged-attention --no-lean-decode-step"
    ).split()
    model = ["--model", str(tmp_path), "--adapter", f"math={adapter_dirs['math']}", "--default-adapter", "math"]
    args = service_main.build_parser().parse_args([*model, *flags])
    config = service_main.config_from_args(args, {"HF_TOKEN": "hf_secret"})
    assert config.engine.max_batch_rows == 4 and config.engine.max_queued == 8
    assert config.engine.linear_kernel is LinearKernel.TORCH and config.engine.ragged_attention is False
    assert config.engine.lean_decode_step is False
    assert (config.engine.max_prompt_tokens, config.engine.max_total_tokens) == (100, 200)
    assert (config.max_adapters, config.max_rank, config.default_adapter) == (3, 16, "math")
    assert config.adapters[0].name == "math" and config.network.max_message_bytes == 8 << 20
    assert config.model.token == "hf_secret" == config.hub_token and "hf_secret" not in repr(config)
    with pytest.raises(ValueError, match="default-adapter"):
        service_main.config_from_args(
            service_main.build_parser().parse_args(["--model", "x", "--default-adapter", "nope"]), {}
        )


def _engine_reference(base_model, tokenizer, adapter_dirs, prompt: str, n: int) -> str:
    config = service_config()
    from tests.service.harness import StepGate

    engine = build_engine(base_model, tokenizer, config, {"math": adapter_dirs["math"]}, StepGate())
    try:
        from loramux.core import GenerationRequest, TokenDelta

        request = GenerationRequest(prompt=prompt, adapter="math", max_new_tokens=n, ignore_eos=True)
        return "".join(e.text for e in engine.submit(request) if isinstance(e, TokenDelta))
    finally:
        engine.close()


def test_loramux_server_subprocess(model_dir, adapter_dirs, base_model, tokenizer, tmp_path):
    """The `loramux-server` console script, started outside the checkout: the install resolves everything."""
    flags = f"--port 0 --device cpu --default-adapter math --grace-period 2 --adapter math={adapter_dirs['math']}"
    cmd = [str(Path(sys.executable).parent / "loramux-server"), "--model", str(model_dir), *flags.split()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            listening = pool.submit(proc.stdout.readline).result(60)
            assert listening.startswith("loramux listening on 127.0.0.1:"), listening
            port = int(listening.strip().rsplit(":", 1)[1])
            assert pool.submit(proc.stdout.readline).result(60).strip() == "loramux ready"
        from loramux.client import LoramuxClient

        with LoramuxClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.health("loramux.v1.GenerationService") == "SERVING"
            assert [a.name for a in client.list_adapters()] == ["math"]
            text = "".join(client.generate("Prove that", max_new_tokens=8, ignore_eos=True))
        assert text == _engine_reference(base_model, tokenizer, adapter_dirs, "Prove that", 8)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err = proc.stderr.read()
    assert "rpc=Generate" in err and "status=OK" in err and "shutting down" in err
