"""A long prompt arriving while 8 streams decode: how long the streams stall, with and without chunked prefill.

    make bench-long-prompt       # or: python -m bench.long_prompt   (part of `make bench`)

The Llama-shaped model of bench/engine.py, no adapters. 8 requests (32 prompt tokens) decode; once each has
streamed a token, a request with a LONG-token prompt arrives. Measured per round, side by side: the longest
gap between two tokens of the 8 streams while the long prompt is prefilled, and the long request's time to
first token. "one-shot" prefills the whole prompt in one forward (--prefill-chunk-tokens above its length);
"chunked" feeds it CHUNK tokens per step between decode steps (the default 512 behaves alike).
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time

import torch

from bench.common import bpe_tokenizer, llama_512
from bench.engine import in_fresh_thread
from loramux.core import AdapterManager, AdapterSelection, Engine, EngineConfig, GenerationRequest, TokenDelta

ROWS, LONG, LONG_NEW, CHUNK, ROUNDS = 8, 1536, 64, 256, 5


class ShortStreams:
    """ROWS short requests decoding on ``engine``, each token's arrival time recorded (one thread per stream)."""

    def __init__(self, engine: Engine, generator: torch.Generator, *, new_tokens: int, started_after: int) -> None:
        prompts = torch.randint(1, 8192, (ROWS, 32), generator=generator).tolist()
        self.stamps: list[list[float]] = [[] for _ in range(ROWS)]
        started = threading.Barrier(ROWS + 1)

        def consume(i: int) -> None:
            request = GenerationRequest(
                prompt=prompts[i], adapter=AdapterSelection.BASE, max_new_tokens=new_tokens, ignore_eos=True
            )
            for n, event in enumerate(engine.submit(request)):
                if isinstance(event, TokenDelta):
                    self.stamps[i].append(time.perf_counter())
                if n == started_after:
                    started.wait()

        self._threads = [threading.Thread(target=consume, args=(i,)) for i in range(ROWS)]
        for t in self._threads:
            t.start()
        started.wait()  # every stream is decoding

    def gaps(self) -> list[tuple[float, float]]:
        """(start, length) of every gap between two tokens of a stream, once all streams have finished."""
        for t in self._threads:
            t.join()
        return [(a, b - a) for s in self.stamps for a, b in itertools.pairwise(s)]


def _engine(model, tokenizer, **config: object) -> Engine:
    engine_config = EngineConfig(max_batch_rows=16, max_prompt_tokens=LONG, **config)  # type: ignore[arg-type]
    return in_fresh_thread(lambda: Engine(model, tokenizer, AdapterManager(model), engine_config))


def one_round(model, tokenizer, chunk: int) -> tuple[float, float]:
    """(longest stall of the running streams, the long request's time to first token), in seconds."""
    engine = _engine(model, tokenizer, prefill_chunk_tokens=chunk)
    generator = torch.Generator().manual_seed(5)
    streams = ShortStreams(engine, generator, new_tokens=400, started_after=0)
    long_prompt = torch.randint(1, 8192, (LONG,), generator=generator).tolist()
    sent = time.perf_counter()
    request = GenerationRequest(prompt=long_prompt, adapter=AdapterSelection.BASE, max_new_tokens=2, ignore_eos=True)
    next(e for e in engine.submit(request) if isinstance(e, TokenDelta))
    ttft = time.perf_counter() - sent
    gaps = streams.gaps()
    engine.close()
    return max(g for a, g in gaps if a + g > sent and a < sent + ttft), ttft


def decode_round(model, tokenizer, *, ragged: bool) -> tuple[float, float]:
    """Median inter-token gap of the short streams before the long prompt arrives, and while the long
    request decodes LONG_NEW tokens beside them, in seconds."""
    engine = _engine(model, tokenizer, prefill_chunk_tokens=CHUNK, ragged_attention=ragged)
    generator = torch.Generator().manual_seed(6)
    streams = ShortStreams(engine, generator, new_tokens=300, started_after=8)
    arrived = time.perf_counter()
    long_prompt = torch.randint(1, 8192, (LONG,), generator=generator).tolist()
    request = GenerationRequest(
        prompt=long_prompt, adapter=AdapterSelection.BASE, max_new_tokens=LONG_NEW, ignore_eos=True
    )
    long_stamps = [time.perf_counter() for e in engine.submit(request) if isinstance(e, TokenDelta)]
    gaps = streams.gaps()
    engine.close()
    before = statistics.median(g for a, g in gaps if a < arrived)
    during = statistics.median(g for a, g in gaps if long_stamps[0] <= a and a + g <= long_stamps[-1])
    return before, during


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = in_fresh_thread(lambda: (llama_512(), bpe_tokenizer(8192)))
    cases = {"one-shot": LONG + 1, "chunked": CHUNK}
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(ROUNDS):
        for name, chunk in cases.items():
            samples[name].append(in_fresh_thread(lambda chunk=chunk: one_round(model, tokenizer, chunk)))
    print(f"== a {LONG}-token prompt arrives while {ROWS} streams decode (median of {ROUNDS} interleaved rounds)")
    for name, values in samples.items():
        stall = statistics.median(v[0] for v in values)
        ttft = statistics.median(v[1] for v in values)
        label = f"{name} ({CHUNK} tokens per step)" if name == "chunked" else name
        print(f"{label:30} longest stall of a running stream {stall * 1e3:7.1f} ms   TTFT {ttft * 1e3:7.1f} ms")
    ratio = statistics.median(v[0] for v in samples["one-shot"]) / statistics.median(v[0] for v in samples["chunked"])
    print(f"stall, one-shot vs chunked: {ratio:.1f}x")
    steady = {"padded (one SDPA call over all columns)": False, "ragged (runs of similar rows)": True}
    gaps: dict[str, list[tuple[float, float]]] = {k: [] for k in steady}
    for _ in range(ROUNDS):
        for name, ragged in steady.items():
            gaps[name].append(in_fresh_thread(lambda ragged=ragged: decode_round(model, tokenizer, ragged=ragged)))
    print(f"== then the long request decodes {LONG_NEW} tokens beside them: inter-token gap of the {ROWS} streams")
    for name, values in gaps.items():
        before = statistics.median(v[0] for v in values)
        during = statistics.median(v[1] for v in values)
        print(f"{name:40} before {before * 1e3:6.1f} ms   during {during * 1e3:6.1f} ms")
    padded, ragged_gap = (statistics.median(v[1] for v in gaps[k]) for k in steady)
    print(f"gap while the long request decodes, padded vs ragged: {padded / ragged_gap:.1f}x")


if __name__ == "__main__":
    main()
