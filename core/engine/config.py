"""The engine's one configuration object: its limits and its kernel choices, checked once when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from loramux.core.lora.kernel_choice import LoraKernel
from loramux.core.model.kernel_choice import row_buckets
from loramux.core.model.linear_kernels import LinearKernel
from loramux.core.model.native_layers import DecodeLayers


@dataclass(frozen=True)
class EngineConfig:
    max_batch_rows: int = 32
    max_queued: int = 256
    max_prompt_tokens: int = 2048
    # prompt + new tokens, per request; None: the model's context length (its positions), else at most that
    max_total_tokens: int | None = None
    # Lowers the model's context length (never raises it past what its positions hold: refused at start).
    max_model_len: int | None = None
    # Bytes the batch's KV cache may hold (its padded cost, spare room included); None: KV_MEMORY_FRACTION of
    # the memory available when the engine starts.
    max_kv_bytes: int | None = None
    default_max_new_tokens: int = 256
    max_new_tokens_ceiling: int = 2048
    # Padded prompt columns prefilled in one step (rows x widest prompt, the part the prefix cache gives a row
    # included); the rest join at the next steps, so running rows keep decoding between parts of a burst, and
    # the first rows of a burst stream while the others wait. A wider single prompt is still admitted alone.
    # 2048: 64 rows of 32 tokens in one step, but one 1k-token cache hit per step (bench.prefix: TTFT p50
    # 302 -> 68 ms against 4096 and counting only uncached tokens).
    max_prefill_tokens: int = 2048
    # A prompt longer than this is prefilled this many tokens per step, between the batch's decode steps
    # (chunked_prefill.py), so running streams do not stall behind it.
    prefill_chunk_tokens: int = 512
    # While rows run, a prefill group smaller than join_fraction of them waits for more ready requests, up to
    # this many steps after its oldest became ready (scheduler.py): a one-row prefill costs the batch about a
    # decode step, so rows that trickle in (adapter loads finishing one by one) are prefilled together. 0
    # prefills each ready request at the next step. 8 and 0.3 (TGI's max_waiting_tokens and
    # waiting_served_ratio are 20 and 0.3): bench.scale 0.62x -> 0.80x, TTFT p50 still below preloaded's.
    join_wait_steps: int = 8
    join_fraction: float = 0.3
    # GEMM for the model's nn.Linear layers on CPU (loramux.core.model.linear_kernels).
    linear_kernel: LinearKernel = LinearKernel.AUTO
    # The model's large CPU weights are moved at start into memory advised for 2 MiB pages (fewer TLB misses as
    # a step streams them; loramux.core.model.huge_pages); False leaves them where loading put them.
    huge_page_weights: bool = True
    # What adds a decode step's grouped LoRA deltas (rows sharing adapters; loramux.core.lora.kernel_choice).
    lora_kernel: LoraKernel = LoraKernel.AUTO
    # Decode steps attend, per run of similar-length rows, only to their own columns of the left-padded cache
    # (loramux.core.model.ragged_attention); False keeps one SDPA call over the whole padded width.
    ragged_attention: bool = True
    # Decode steps of a Llama-family model call its modules directly, without transformers' forward around
    # them (loramux.core.model.decode_step; the same logits bit for bit, checked at start); False: the forward.
    lean_decode_step: bool = True
    # Whether that step runs each layer's ops around attention as two native calls (native_layers.py; logits
    # within fp32 rounding of the forward's, checked at start): auto where a timed step was faster with them
    # (under an explicit torch or onednn linear kernel: never), native at every row count, torch never.
    decode_layers: DecodeLayers = DecodeLayers.AUTO
    # Bytes of prompt KV kept for reuse by later prompts that start the same way, per owner (base model or one
    # adapter load; prefix_cache.py); 0 turns the cache off; None: PREFIX_CACHE_DEFAULT_BYTES, at most
    # PREFIX_CACHE_MEMORY_FRACTION of the memory available when the engine starts.
    prefix_cache_bytes: int | None = None
    # Tokens per cached block: a prompt reuses whole blocks.
    prefix_block_tokens: int = 16

    def __post_init__(self) -> None:
        given = [name for name in OPTIONAL_LIMITS if getattr(self, name) is not None]
        small = [f"{n}={getattr(self, n)!r}" for n in (*LIMITS, *given) if not _is_positive_int(getattr(self, n))]
        cache = self.prefix_cache_bytes
        if cache is not None and not (isinstance(cache, int) and not isinstance(cache, bool) and cache >= 0):
            small.append(f"prefix_cache_bytes={cache!r} (0 turns the cache off)")
        if not (isinstance(self.join_wait_steps, int) and not isinstance(self.join_wait_steps, bool)) or (
            self.join_wait_steps < 0
        ):
            small.append(f"join_wait_steps={self.join_wait_steps!r} (0 joins at once)")
        if not isinstance(self.join_fraction, (int, float)) or not 0.0 <= self.join_fraction <= 1.0:
            small.append(f"join_fraction={self.join_fraction!r} (between 0 and 1)")
        if small:
            raise ValueError(f"engine limits must be integers >= 1: {', '.join(small)}")
        if not isinstance(self.linear_kernel, LinearKernel):
            raise ValueError(f"linear_kernel must be a LinearKernel (got {self.linear_kernel!r})")
        if not isinstance(self.lora_kernel, LoraKernel):
            raise ValueError(f"lora_kernel must be a LoraKernel (got {self.lora_kernel!r})")

        if not isinstance(self.decode_layers, DecodeLayers):
            raise ValueError(f"decode_layers must be a DecodeLayers (got {self.decode_layers!r})")
        if not isinstance(self.huge_page_weights, bool):
            raise ValueError(f"huge_page_weights must be a bool (got {self.huge_page_weights!r})")

    def linear_kernel_options(self) -> dict[str, Any]:
        """start_linear_kernels' keywords: auto times the kernels at the batch's and a prefill chunk's row counts."""
        return {
            "max_batch_rows": self.max_batch_rows,
            "prefill_rows": self.prefill_chunk_tokens,
            "huge_pages": self.huge_page_weights,
        }

    def decode_layer_options(self) -> dict[str, Any]:
        """Decoder's keywords for native layers: auto gives way to a linear kernel fixed to torch or onednn."""
        fixed = self.linear_kernel in (LinearKernel.TORCH, LinearKernel.ONEDNN)
        layers = DecodeLayers.TORCH if fixed and self.decode_layers is DecodeLayers.AUTO else self.decode_layers
        rows = row_buckets(max_batch_rows=self.max_batch_rows, prefill_rows=self.max_batch_rows)
        return {"layers": layers, "rows": rows}


KV_MEMORY_FRACTION: Final = 0.4  # of the memory available at start, when max_kv_bytes is not given
PREFIX_CACHE_DEFAULT_BYTES: Final = 512 * 2**20
PREFIX_CACHE_MEMORY_FRACTION: Final = 0.1

# The fields that are limits or sizes (each an int >= 1), in declaration order; OPTIONAL_LIMITS may be None.
OPTIONAL_LIMITS: Final = ("max_total_tokens", "max_model_len", "max_kv_bytes")
LIMITS: Final = (
    "max_batch_rows",
    "max_queued",
    "max_prompt_tokens",
    "default_max_new_tokens",
    "max_new_tokens_ceiling",
    "max_prefill_tokens",
    "prefill_chunk_tokens",
    "prefix_block_tokens",
)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
