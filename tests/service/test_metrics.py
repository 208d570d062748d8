"""Observability: Prometheus /metrics scraped over HTTP after real RPCs (counts per adapter, tokens, latency
histograms, queue and batch gauges, adapter lifecycle, the lora_requests_info gauge routers read), and the
access log line (request id, adapter, tokens, durations, status, traceparent)."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loramux.service import __main__ as service_main
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb
from tests.service.harness import Harness, expect_failure, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
PROMPT = "Prove that the sum"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: Harness) -> Samples:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    metrics = server.server.metrics
    assert metrics is not None and metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def generate(server: Harness, n: int, **fields) -> gpb.GenerationFinished:
    responses = server.generate(text=PROMPT, stopping=gpb.StoppingCriteria(max_new_tokens=n, ignore_eos=True), **fields)
    return responses[-1].finished


def test_metrics_are_off_without_a_port(server):
    assert server.server.metrics is None
    parse = service_main.build_parser().parse_args
    assert service_main.config_from_args(parse(["--model", "x", "--metrics-port", "0"]), {}).metrics_port == 0
    assert service_main.config_from_args(parse(["--model", "x"]), {}).metrics_port is None


def test_scrape_counts_mixed_adapter_generations_per_adapter(make_server):
    server = make_server(metrics_port=0)
    finished = [generate(server, 5, adapter="math"), generate(server, 5, adapter="math")]
    finished += [generate(server, 3, adapter="poet"), generate(server, 4, adapter="")]
    assert expect_failure(server.generate, text=PROMPT, adapter="nope").code is grpc.StatusCode.NOT_FOUND
    expect_failure(server.adapters.ListAdapters, apb.ListAdaptersRequest(page_size=-1))
    listed = server.adapters.ListAdapters(apb.ListAdaptersRequest())

    s = scrape(server)
    requests = "loramux_requests_total"
    assert value(s, requests, rpc="Generate", adapter="math", status="OK") == 2
    assert value(s, requests, rpc="Generate", adapter="poet", status="OK") == 1
    assert value(s, requests, rpc="Generate", adapter="", status="OK") == 1  # "": the bare base model
    assert value(s, requests, rpc="Generate", adapter="(other)", status="NOT_FOUND") == 1  # never resident
    assert value(s, requests, rpc="ListAdapters", adapter="", status="INVALID_ARGUMENT") == 1
    assert value(s, "loramux_request_duration_seconds_count", rpc="Generate") == 5

    assert value(s, "loramux_completion_tokens_total", adapter="math") == 10
    assert value(s, "loramux_completion_tokens_total", adapter="poet") == 3
    assert value(s, "loramux_completion_tokens_total", adapter="") == 4
    assert value(s, "loramux_prompt_tokens_total", adapter="math") == 2 * finished[0].usage.prompt_tokens
    assert value(s, "loramux_prompt_tokens_total", adapter="poet") == finished[2].usage.prompt_tokens
    assert value(s, "loramux_time_to_first_token_seconds_count") == 4
    assert value(s, "loramux_inter_token_latency_seconds_count") == (5 - 1) * 2 + (3 - 1) + (4 - 1)
    assert value(s, "loramux_time_to_first_token_seconds_bucket", le="+Inf") == 4

    assert value(s, "loramux_num_requests_waiting") == 0 and value(s, "loramux_num_requests_running") == 0
    assert value(s, "loramux_engine_steps_total") >= 4 + 4 + 2 + 3  # one decode step per token after the first
    assert value(s, "loramux_adapters_resident") == 2 and value(s, "loramux_adapters_max") == 64
    sizes = {a.name: a.size_bytes for a in listed.adapters}
    assert value(s, "loramux_adapters_resident_bytes") == sum(sizes.values())
    assert value(s, "loramux_adapter_bytes", adapter="poet") == sizes["poet"]


def test_lora_requests_info_shows_running_and_waiting_adapters(make_server):
    """The gauge gateway routers read for adapter affinity, in vLLM's label format, while the engine is held
    with `math` in its one batch row and `poet` queued."""
    server = make_server(metrics_port=0, max_batch_rows=1)
    long = gpb.StoppingCriteria(max_new_tokens=2000, ignore_eos=True)
    server.gate.close()
    running = server.generation.Generate(gpb.GenerateRequest(text=PROMPT, adapter="math", stopping=long))
    next(running)  # admitted and prefilled; the first decode step holds at the gate
    assert server.gate.held.wait(10)
    waiting = server.generation.Generate(gpb.GenerateRequest(text=PROMPT, adapter="poet", stopping=long))
    assert server.engine is not None
    wait_until(lambda: server.engine is not None and server.engine.queued == 1, what="the poet request to queue")

    before = time.time()
    s = scrape(server)
    info = [(dict(labels), v) for (name, labels), v in s.items() if name == "loramux_lora_requests_info"]
    assert info == [({"max_lora": "64", "running_lora_adapters": "math", "waiting_lora_adapters": "poet"}, info[0][1])]
    assert before - 5 <= info[0][1] <= time.time() + 5  # the value is the scrape's Unix time, as in vLLM
    assert value(s, "loramux_num_requests_running") == 1 and value(s, "loramux_num_requests_waiting") == 1
    held = server.engine.load()  # one row: its prompt and first token's position, no padding
    assert value(s, "loramux_kv_cache_tokens") == held.kv_cache_tokens > 0
    assert value(s, "loramux_kv_cache_padded_tokens") == held.kv_cache_padded_tokens >= held.kv_cache_tokens
    assert value(s, "loramux_kv_cache_bytes") > 0

    running.cancel()
    waiting.cancel()
    server.gate.open()
    wait_until(lambda: server.engine is not None and server.engine.running_rows == 0, what="the rows to go")

    def cancelled(adapter: str) -> float:
        return value(scrape(server), "loramux_requests_total", rpc="Generate", adapter=adapter, status="CANCELLED")

    wait_until(lambda: cancelled("math") == cancelled("poet") == 1, what="both cancels counted, by adapter")
    s = scrape(server)
    assert value(s, "loramux_completion_tokens_total", adapter="math") >= 1  # streamed before the cancel
    idle = (("max_lora", "64"), ("running_lora_adapters", ""), ("waiting_lora_adapters", ""))
    assert ("loramux_lora_requests_info", idle) in s
    assert value(s, "loramux_kv_cache_bytes") == value(s, "loramux_kv_cache_tokens") == 0  # freed with the rows


def test_adapter_loads_evictions_and_unloads(make_server, adapter_dirs):
    server = make_server(metrics_port=0, max_adapters=2)  # math and poet resident: the slots are full
    load = apb.LoadAdapterRequest(name="third", source=str(adapter_dirs["math"]))
    assert not server.adapters.LoadAdapter(load).already_loaded  # evicts the least recently used (math)
    server.adapters.LoadAdapter(apb.LoadAdapterRequest(name="poet", source=str(adapter_dirs["math"]), replace=True))
    server.adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="third"))
    s = scrape(server)
    assert value(s, "loramux_adapter_loads_total") == 2  # third, and poet's replacement
    assert value(s, "loramux_adapter_evictions_total", cause="max_adapters") == 1
    assert value(s, "loramux_adapter_unloads_total") == 1
    assert value(s, "loramux_adapter_load_seconds_count") == 2 and value(s, "loramux_adapter_load_seconds_sum") > 0
    assert value(s, "loramux_adapters_resident") == 1 and value(s, "loramux_adapters_registered") == 2
    assert value(s, "loramux_requests_total", rpc="LoadAdapter", adapter="third", status="OK") == 1
    assert value(s, "loramux_requests_total", rpc="UnloadAdapter", adapter="third", status="OK") == 1


def test_access_log_line_carries_ids_adapter_tokens_durations_and_trace(server, caplog):
    caplog.set_level("INFO", logger="loramux.access")
    server.adapters.SetAdapter(apb.SetAdapterRequest(name="poet"))
    call = server.generation.Generate(
        gpb.GenerateRequest(text=PROMPT, stopping=gpb.StoppingCriteria(max_new_tokens=3, ignore_eos=True)),
        metadata=(("x-request-id", "trace-me"), ("traceparent", TRACEPARENT)),
    )
    assert len(list(call)) == 4
    assert ("x-request-id", "trace-me") in call.initial_metadata()
    wait_until(lambda: "request_id=trace-me" in caplog.text, what="the access log line")
    (line,) = [r.getMessage() for r in caplog.records if "request_id=trace-me" in r.getMessage()]
    fields = dict(part.split("=", 1) for part in line.split())
    assert fields["rpc"] == "Generate" and fields["status"] == "OK" and fields["adapter"] == "poet"  # the default
    assert fields["completion_tokens"] == "3" and int(fields["prompt_tokens"]) > 0
    assert float(fields["ttft_ms"]) <= float(fields["duration_ms"])
    assert fields["traceparent"] == TRACEPARENT


def test_prefix_cache_metrics_count_hits_tokens_and_bytes(make_server):
    server = make_server(metrics_port=0, prefix_block_tokens=2)
    first = generate(server, 3, adapter="math")
    second = generate(server, 3, adapter="math")  # the same prompt: its blocks, all but the last token's
    third = generate(server, 3, adapter="poet")  # another adapter: never the first one's blocks
    s = scrape(server)
    reusable = (first.usage.prompt_tokens - 1) // 2 * 2
    assert reusable > 0
    assert [f.usage.cached_prompt_tokens for f in (first, second, third)] == [0, reusable, 0]
    assert value(s, "loramux_prefix_cache_hits_total") == 1
    assert value(s, "loramux_prefix_cache_misses_total") == 2
    assert value(s, "loramux_prefix_cache_hit_tokens_total") == reusable
    assert value(s, "loramux_prefix_cache_lookup_tokens_total") == 3 * first.usage.prompt_tokens
    assert 0 < value(s, "loramux_prefix_cache_bytes") <= value(s, "loramux_prefix_cache_max_bytes")
    assert value(s, "loramux_prefix_cache_blocks") > 0


def test_prefix_cache_flags():
    parse = service_main.build_parser().parse_args
    config = service_main.config_from_args(parse(["--model", "x", "--prefix-cache-memory", "64MiB"]), {})
    assert config.engine.prefix_cache_bytes == 64 * 2**20
    off = service_main.config_from_args(parse(["--model", "x", "--prefix-cache-memory", "0"]), {})
    assert off.engine.prefix_cache_bytes == 0
    default = service_main.config_from_args(parse(["--model", "x", "--prefix-block-tokens", "16"]), {})
    assert (default.engine.prefix_cache_bytes, default.engine.prefix_block_tokens) == (None, 16)
    for bad in (["--prefix-cache-memory", "lots"], ["--prefix-block-tokens", "0"]):
        with pytest.raises(SystemExit):
            parse(["--model", "x", *bad])
