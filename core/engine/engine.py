"""The generation engine: one thread owns the model and decodes every running request in one batch.

Each loop iteration (a *step*): drop cancelled rows, admit queued requests (prefill them together, after
whatever the prefix cache holds of their prompts; sample their first token, merge their KV cache into the
batch), then one decode forward for all rows, whatever adapter each uses (a per-row routing plan, extended
when rows join and compacted when they leave). Each step's events go to the requests' channels together
(``deliver``). Rows add their prompts' blocks to the prefix cache when they join, and their answers' when
they leave (``prefix_reuse``).

Requests are validated before they are queued (``admission``); which waiting requests join at a step is
the scheduler's decision (``scheduler``, no model needed). On its thread the engine first switches the
model's linear layers to the configured GEMM (``model.linear_kernels``; auto: timed here, ``kernel_choice``)
and, for a model on SDPA, its decode attention to runs of similar-length rows (``model.ragged_attention``);
its KV cache grows in place (``model.kv_cache``), on pages an arena keeps from batch to batch
(``loramux.core.memory.BufferArena``, bounded by the KV budget).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from loramux.core.adapters.manager import AdapterManager
from loramux.core.engine.admission import Admission
from loramux.core.engine.chunked_prefill import ChunkedPrefill
from loramux.core.engine.config import EngineConfig
from loramux.core.engine.emit import emit_tokens
from loramux.core.engine.limits import EngineLimits, resolve_limits
from loramux.core.engine.load import EngineLoad, engine_load
from loramux.core.engine.outputs import eos_ids, finished_event
from loramux.core.engine.prefill import prefill_rows
from loramux.core.engine.prefix_cache import PrefixCache, PrefixStats
from loramux.core.engine.prefix_reuse import RowPrefixes, split_by_reuse
from loramux.core.engine.requests import EventChannel, GenerationRequest, deliver
from loramux.core.engine.row import Row
from loramux.core.engine.scheduler import Scheduler, StepAdmission
from loramux.core.errors import (
    CapacityExceededError,
    EngineFailure,
    LoramuxError,
    RequestCancelledError,
    ShuttingDownError,
)
from loramux.core.lora.kernel_choice import LoraKernelChoice, start_lora_kernel
from loramux.core.lora.routing import RoutingPlan, build_plan, extend_plan, swap_remove, use_plan
from loramux.core.lora.workspace import RoutingWorkspace
from loramux.core.memory import ArenaStats, BufferArena
from loramux.core.model import kv_batch
from loramux.core.model.decoder import Decoder
from loramux.core.model.kernel_choice import KernelChoice, start_linear_kernels
from loramux.core.model.kv_cache import GrowableCache
from loramux.core.model.ragged_attention import decode_segments, use_ragged_attention

log = logging.getLogger(__name__)


class Engine:
    """Generates for many requests at once on one thread that owns the model.

    ``submit`` (any thread) validates a request and queues it; the engine thread admits queued requests at
    step boundaries, decodes every running row in one forward, and streams events to each request's channel.
    Keep other long-lived threads off torch: each keeps an OpenMP pool, and two live pools slow the engine's
    steps markedly on small machines (BENCHMARKS.md).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        manager: AdapterManager,
        config: EngineConfig,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.manager, self.config = model, tokenizer, manager, config
        self._on_step = on_step  # called on the engine thread with the batch size of each decode step
        self._eos = eos_ids(model, tokenizer)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos, default=0)
        self._device = next(model.parameters()).device
        self.limits: EngineLimits  # set by the engine thread before the constructor returns
        self._scheduler: Scheduler[Row] = Scheduler(
            max_rows=config.max_batch_rows,
            prefill_tokens=config.max_prefill_tokens,
            chunk_tokens=config.prefill_chunk_tokens,
            prompt_len=lambda row: len(row.prompt_ids) - self._prefixes.cached_tokens(row),  # what it prefills
            state=lambda row: row.readiness(self.manager),
            key=lambda row: row.key,
            final_len=lambda row: row.final_len,
            width=lambda row: len(row.prompt_ids),  # cached part included: the group holds it all
            kv_fits=lambda finals: self.limits.kv.fits(finals),
            join_wait_steps=config.join_wait_steps,
            join_fraction=config.join_fraction,
        )
        self._wakeup = threading.Condition()  # guards the scheduler's queue and _stop_requested
        manager.add_load_listener(self._wake)  # a finished adapter load may let waiting requests start
        self._stop_requested = False
        self._accepting = True
        self._rows: list[Row] = []
        self._cache: GrowableCache | None = None
        self._mask: Tensor | None = None
        self._plan: RoutingPlan | None = None
        self._workspace = RoutingWorkspace(rows=config.max_batch_rows)  # the decode plan's stacks, kept
        self._chunking: ChunkedPrefill | None = None  # a long prompt being prefilled a chunk per step
        self._ragged = False  # decode attention skips rows' left padding (loramux.core.model.ragged_attention)
        self.decoder: Decoder  # a step's logits (native_choice: the layers start chose), set by the engine thread
        self.steps = 0
        self.linear_kernel = config.linear_kernel  # the one in use, set by the engine thread before it serves
        self.kernel_choice: KernelChoice | None = None  # what --linear-kernel auto measured
        self.lora_kernel = LoraKernelChoice(kernel=None)  # --lora-kernel's, set by the engine thread
        ready, failed = threading.Event(), list[BaseException]()
        self._thread = threading.Thread(target=self._run, args=(ready, failed), name="loramux-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            manager.remove_load_listener(self._wake)
            raise failed[0]
        vocab_size: int = getattr(model, "get_input_embeddings")().num_embeddings  # noqa: B009
        self._admission = Admission(config, self.limits, tokenizer, manager, vocab_size, eos=frozenset(self._eos))

    # -- caller side (any thread) ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> EventChannel:
        """Validate and enqueue; errors for bad input, unknown adapters and full queues raise right here."""
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        row = self._admission.admit(request)
        try:
            with self._wakeup:
                if self._stop_requested:
                    raise ShuttingDownError("the server is shutting down and accepts no new requests")
                if len(self._scheduler) >= self.config.max_queued:
                    raise CapacityExceededError(
                        f"the queue holds {self.config.max_queued} requests already", field="queue"
                    )
                self._scheduler.add(row)
                row.channel.on_cancel = self._wake  # a cancelled waiting request leaves (and lets go) promptly
                self._wakeup.notify()
        except BaseException:
            row.release(self.manager)
            raise
        return row.channel

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids exactly as ``submit`` would see them (any thread; the Tokenize RPC)."""
        return self._admission.tokenize(request)

    def precheck(self, request: GenerationRequest) -> None:
        """The checks of ``submit`` that need no tokenizing, cheap enough for an event loop (oversize text)."""
        self._admission.precheck(request)

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    @property
    def cached_rows(self) -> int:
        """Rows held in the KV cache (equals running_rows between steps)."""
        cache = self._cache
        return 0 if cache is None or not cache.layers else int(cache.layers[0].keys.shape[0])  # type: ignore[union-attr]

    @property
    def queued(self) -> int:
        return len(self._scheduler)

    def load(self) -> EngineLoad:
        """A snapshot of the batch and the queue, from any thread (read-only; a row may be mid-admission)."""
        with self._wakeup:  # held only to copy the queue
            waiting = list(self._scheduler)
            kv_blocked = self._scheduler.kv_blocked
        cache = self._cache
        chunk = self._chunking
        return engine_load(
            rows=list(self._rows),
            waiting=[*waiting, *([chunk.row] if chunk is not None else [])],
            steps=self.steps,
            caches=[c for c in (cache, chunk.cache if chunk is not None else None) if c is not None],
            mask=self._mask,
            kv_max_bytes=self.limits.kv.max_bytes,
            kv_blocked=kv_blocked,
        )

    def prefix_stats(self) -> PrefixStats:
        return self._prefixes.cache.stats()

    def kv_memory(self) -> ArenaStats:
        """The KV arena's pieces lent now, and the pages it keeps resident (any thread)."""
        return self._kv_arena.stats()

    def stop_accepting(self) -> None:
        self._accepting = False

    def close(self, *, timeout: float | None = None) -> None:
        """Stop the engine thread; anything still queued or running ends with ShuttingDownError."""
        self._accepting = False
        with self._wakeup:
            self._stop_requested = True
            self._wakeup.notify()
        self._thread.join(timeout)
        self.manager.remove_load_listener(self._wake)

    # -- engine thread --------------------------------------------------------------------------------

    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        try:  # on this thread: the only one that runs the model's torch ops (see the class docstring)
            config = self.config
            rows = config.linear_kernel_options()  # the row counts auto times at; the weights' pages
            self.linear_kernel, self.kernel_choice = start_linear_kernels(self.model, config.linear_kernel, **rows)
            self.lora_kernel = start_lora_kernel(self.model, config.lora_kernel, max_batch_rows=config.max_batch_rows)
            self._workspace.grouped_kernel = self.lora_kernel.kernel
            self._ragged = self.config.ragged_attention and use_ragged_attention(self.model)
            self.decoder = Decoder(self.model, lean=config.lean_decode_step, **config.decode_layer_options())
            self.limits = resolve_limits(self.config, self.model, self.tokenizer)
            cache = PrefixCache(max_bytes=self.limits.prefix_cache_bytes, block_tokens=self.config.prefix_block_tokens)
            self._prefixes = RowPrefixes(cache)
            self._kv_arena = BufferArena(max_bytes=self.limits.kv.max_bytes)  # KV pages kept between batches
        except BaseException as exc:  # the constructor raises it
            failed.append(exc)
            return
        finally:
            ready.set()
        while (step := self._next_step()) is not None:
            try:
                self._start(step)
                self._drop_finished()
                if self._chunking is not None:
                    self._prefill_chunk()
                with torch.no_grad():
                    if self._rows:
                        self._decode_step()
                self._drop_finished()
            except Exception as exc:  # a bug or OOM: this batch's rows end with an error, the engine serves on
                log.exception("engine step failed")
                if self._chunking is not None:
                    self._leave(self._chunking.row, EngineFailure("generation failed inside the engine"))
                    self._chunking = None
                self._fail_all(EngineFailure("generation failed inside the engine"), exc)
        self._fail_all(ShuttingDownError("the server shut down before this request finished"), None)
        self._drain_queue()

    def _next_step(self) -> StepAdmission[Row] | None:
        """What joins the batch now; waits while nothing runs and nothing can start. None once asked to stop."""
        with self._wakeup:
            while not self._stop_requested:
                chunk = self._chunking
                finals = [r.final_len for r in (*self._rows, *([chunk.row] if chunk is not None else []))]
                # rows gone since the buffers were allocated keep their room until the next regrow or merge
                finals += [1] * (self._cache.buffer_rows() - len(self._rows) if self._cache is not None else 0)
                step = self._scheduler.next_step(running=len(self._rows), chunking=chunk is not None, finals=finals)
                if not step.empty or self._rows or self._chunking is not None:
                    return step
                # idle: woken by a submit, a cancel, a finished adapter load or close (re-checked each second)
                self._wakeup.wait(timeout=1.0)
            return None

    def _leave(self, row: Row, error: BaseException | None = None) -> None:
        """The row is done with the engine: its error (if any) goes to its caller, its claims and blocks back."""
        if error is not None:
            row.channel.put(error)
        row.release(self.manager)
        self._prefixes.release(row)

    def _start(self, step: StepAdmission[Row]) -> None:
        try:  # whatever fails here, this step's rows that did not join end with an error (none is left waiting)
            for row in step.dropped:
                self._leave(row, row.error or RequestCancelledError("the request was cancelled before it started"))
            with torch.no_grad():
                if step.chunked is not None:  # it starts after the part of it the cache holds
                    blocks, room = self._prefixes.take(step.chunked), self.config.prefill_chunk_tokens
                    self._chunking = ChunkedPrefill.after(step.chunked, blocks, room=room, arena=self._kv_arena)
                for rows, reused in split_by_reuse(step.prefill, self._prefixes):
                    cache, mask, logits = prefill_rows(
                        self.model, rows, reused, pad=self._pad, device=self._device, arena=self._kv_arena
                    )
                    self._join(rows, cache, mask, logits)
        except Exception:
            log.exception("starting rows failed")
            for row in [*step.prefill, *([step.chunked] if step.chunked is not None else [])]:
                if row in self._rows:  # it joined before the failure: it leaves at the next step
                    row.channel.put(EngineFailure("generation failed inside the engine"))
                    row.channel.cancel()
                elif self._chunking is None or self._chunking.row is not row:  # a chunked prefill that started goes on
                    self._leave(row, EngineFailure("generation failed inside the engine"))

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt being prefilled; after the last, its row joins the batch."""
        job = self._chunking
        assert job is not None
        if job.row.channel.cancelled.is_set():
            self._chunking = None
            self._leave(job.row, RequestCancelledError("the request was cancelled"))
            return
        try:
            with torch.no_grad():
                logits = job.step(self.model, chunk=self.config.prefill_chunk_tokens, device=self._device)
                if logits is not None:
                    self._chunking = None
                    self._join([job.row], job.cache, job.mask(device=self._device), logits)
        except Exception:
            log.exception("chunked prefill failed")
            self._chunking = None
            if job.row in self._rows:  # it joined before the failure: it leaves at the next step
                job.row.channel.put(EngineFailure("generation failed inside the engine"))
                job.row.channel.cancel()
            else:
                self._leave(job.row, EngineFailure("generation failed inside the engine"))

    def _join(self, new: list[Row], cache: GrowableCache, mask: Tensor, logits: Tensor) -> None:
        """Prefilled rows (their cache, mask (N, S) and last logits (N, V)) join the decode batch."""
        for i, row in enumerate(new):  # their prompts' blocks, from the new rows' own cache (before merging)
            self._prefixes.store_prompt(row, cache, i)
        if self._cache is None or self._mask is None:  # the whole batch; its plan: at the next decode step
            self._cache, self._mask = cache, mask
        else:
            self._mask = kv_batch.merge(self._cache, self._mask, cache, mask)
            if self._plan is not None:  # the new rows join the decode plan at its end, like the cache
                old, joining = [r.weights for r in self._rows], [r.weights for r in new]
                self._plan = extend_plan(self._plan, old, joining, workspace=self._workspace)
        self._rows.extend(new)
        self._emit(new, logits)

    def _decode_step(self) -> None:
        assert self._cache is not None and self._mask is not None
        rows = self._rows
        if self._plan is None:
            self._plan = build_plan([r.weights for r in rows], workspace=self._workspace)
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self._device)  # (N, 1)
        positions = kv_batch.next_positions(self._mask)  # (N, 1)
        mask = self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        # each row's real tokens, the one fed now included: its position + 1 (no second pass over the mask)
        segments = decode_segments((positions[:, 0] + 1).tolist(), mask.shape[1]) if self._ragged else None
        with use_plan(plan := self._plan):
            logits = self.decoder(
                ids, positions=positions, mask=mask, cache=self._cache, segments=segments, routes=plan.routes
            )
        self.steps += 1
        if self._on_step is not None:
            self._on_step(len(rows))
        self._emit(rows, logits)

    def _emit(self, rows: Sequence[Row], logits: Tensor) -> None:
        emit_tokens(rows, logits, eos=self._eos)

    def _drop_finished(self) -> None:
        """Rows that finished or were cancelled leave; the last rows fill their places (swap_remove), so the
        KV cache is re-selected but the routing plan only copies the moved rows."""
        removed = {i for i, r in enumerate(self._rows) if r.finish is not None or r.channel.cancelled.is_set()}
        if not removed:
            return
        deliver(
            [
                (row.channel, finished_event(row, row.finish))
                if row.finish is not None
                else (row.channel, RequestCancelledError("the request was cancelled"))
                for row in (self._rows[i] for i in sorted(removed))
            ]
        )
        assert self._cache is not None and self._mask is not None
        held = self._mask.sum(dim=1).tolist()  # tokens each row has KV for (its last token was never fed)
        for i in removed:
            self._prefixes.store_output(self._rows[i], self._cache, i, length=held[i])
            self._leave(self._rows[i])
        order, moves = swap_remove(len(self._rows), removed)
        self._rows = [self._rows[i] for i in order]
        if not self._rows:
            self._cache, self._mask = None, None
            self._drop_plan()
            return
        self._mask = kv_batch.select_rows(self._cache, self._mask, order)
        if self._plan is not None:
            self._plan = self._plan.compact(moves, len(order))

    def _fail_all(self, error: LoramuxError, cause: BaseException | None) -> None:
        error.__cause__ = cause
        for row in self._rows:
            self._leave(row, error)
        self._rows, self._cache, self._mask = [], None, None
        self._drop_plan()

    def _drop_plan(self) -> None:
        """The decode plan's buffers go back to the workspace, for the next batch's plan."""
        if self._plan is not None:
            self._plan.release()
        self._plan = None

    def _drain_queue(self) -> None:
        if self._chunking is not None:
            self._leave(self._chunking.row, ShuttingDownError("the server shut down before this request finished"))
            self._chunking = None
        with self._wakeup:
            waiting = self._scheduler.drain()
        for row in waiting:
            self._leave(row, ShuttingDownError("the server shut down before this request started"))
