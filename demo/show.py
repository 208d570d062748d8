"""`make demo`: one prompt, streamed at once through the base model and every adapter, side by side.

The requests go to loramux's Engine in-process (no gRPC): it decodes all of them in the same batch, each row
through its own adapter. The footer shows the batch of every decode step as it happens. On a terminal the
columns fill in live; piped, the final columns are printed once.

    python -m loramux.demo.show [--prompt TEXT] [--max-new-tokens N] [--delay SECONDS] [--assets DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging as hf_logging

from loramux.core import AdapterSelection, Engine, EngineConfig, EventChannel, Finished, GenerationRequest, TokenDelta
from loramux.demo import ASSETS_DIR, DEMO_PROMPT
from loramux.demo.corpus import TRANSFORMS
from loramux.demo.loading import load_demo

_GAP = " │ "
_COLORS = ("\x1b[1m", "\x1b[36m", "\x1b[33m", "\x1b[35m", "\x1b[32m", "\x1b[34m")
_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"


@dataclass
class Stream:
    label: str  # "base" or an adapter name
    text: str = ""
    finish: str = ""  # why it ended, once it has


@dataclass
class Board:
    """What is on screen: the streams and the batch sizes of the decode steps so far."""

    prompt: str
    streams: list[Stream]
    steps: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def consume(channel: EventChannel, stream: Stream, board: Board) -> None:
    for event in channel:
        with board.lock:
            if isinstance(event, TokenDelta):
                stream.text += event.text
            elif isinstance(event, Finished):
                stream.finish = event.reason.value


def render(board: Board, *, width: int, color: bool, footer: bool = True) -> list[str]:
    n = len(board.streams)
    col = max(16, (width - len(_GAP) * (n - 1)) // n)
    with board.lock:
        columns = [_wrap(board.prompt, s.text, col) for s in board.streams]
        heads = [s.label + (f" ({s.finish})" if s.finish else "") for s in board.streams]
        steps = list(board.steps)
    height = max(len(c) for c in columns)
    lines = [_join([h.ljust(col)[:col] for h in heads], color=color, bold=True)]
    lines.append(_GAP.join("─" * col for _ in columns).replace(" │ ", "─┼─"))
    for i in range(height):
        lines.append(_join([(c[i] if i < len(c) else "").ljust(col) for c in columns], color=color))
    if footer:
        lines += ["", _footer(steps)]
    return lines


def _wrap(prompt: str, text: str, width: int) -> list[str]:
    """The prompt (marked with » «) and the continuation, wrapped; newlines of the text are kept."""
    out: list[str] = []
    for paragraph in f"»{prompt}«{text}".split("\n"):
        out.extend(textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=True) or [""])
    return out


def _join(cells: Sequence[str], *, color: bool, bold: bool = False) -> str:
    if not color:
        return _GAP.join(cells).rstrip()
    weight = _BOLD if bold else ""
    painted = [f"{_COLORS[i % len(_COLORS)]}{weight}{c}{_RESET}" for i, c in enumerate(cells)]
    return _GAP.join(painted)


def _footer(steps: Sequence[int]) -> str:
    if not steps:
        return "waiting for the first decode step..."
    return f"decode step {len(steps)}: {_rows(steps[-1])} in one forward pass"


def summary(steps: Sequence[int], labels: Sequence[str]) -> str:
    """How the streams shared the engine's decode steps (rows leave the batch as they finish)."""
    together = sum(rows == len(labels) for rows in steps)
    mix = ", ".join(f"{_rows(rows)} × {k}" for rows, k in sorted(Counter(steps).items(), reverse=True))
    return (
        f"{len(steps)} decode steps; {together} of them ran all {len(labels)} streams "
        f"({', '.join(labels)}) in one forward pass. Rows per step: {mix}."
    )


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def read_back(board: Board) -> list[str]:
    """Each adapter's continuation through its transform's inverse: the plain text it stands for."""
    lines = []
    for s in board.streams:
        if s.label in TRANSFORMS:
            plain = TRANSFORMS[s.label][1](s.text.strip()).replace("\n", " ⏎ ")
            lines.append(f"{s.label:>9}: {board.prompt} {plain}")
    return lines


def run(*, assets: Path, prompt: str, max_new_tokens: int, delay: float, live: bool, width: int) -> Board:
    demo = load_demo(model_dir=assets / "model", adapters_dir=assets / "adapters")
    board = Board(prompt=prompt, streams=[Stream("base")] + [Stream(a) for a in demo.adapters])

    def on_step(rows: int) -> None:  # on the engine thread, once per decode step
        with board.lock:
            board.steps.append(rows)
        if delay:
            time.sleep(delay)  # only so that a human can watch the tokens arrive

    engine = Engine(demo.model, demo.tokenizer, demo.manager, EngineConfig(), on_step=on_step)
    choices: list[str | AdapterSelection] = [AdapterSelection.BASE, *demo.adapters]
    channels = [
        engine.submit(GenerationRequest(prompt=prompt, adapter=choice, max_new_tokens=max_new_tokens))
        for choice in choices
    ]
    consumers = [
        threading.Thread(target=consume, args=(ch, s, board), daemon=True)
        for ch, s in zip(channels, board.streams, strict=True)
    ]
    for t in consumers:
        t.start()
    shown = 0
    while any(t.is_alive() for t in consumers):
        if live:
            shown = _redraw(render(board, width=width, color=True), shown)
        time.sleep(0.05)
    engine.close()
    lines = render(board, width=width, color=live, footer=live)
    if live:
        _redraw(lines, shown)
    else:
        print("\n".join(lines))
    return board


def _redraw(lines: list[str], shown: int) -> int:
    """Replace the previously drawn block of ``shown`` lines by ``lines``."""
    prefix = f"\x1b[{shown}F\x1b[J" if shown else ""
    sys.stdout.write(prefix + "\n".join(lines) + "\n")
    sys.stdout.flush()
    return len(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--assets", type=Path, default=ASSETS_DIR, help="a folder written by demo.train --out")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--delay", type=float, default=None, help="seconds per decode step (default: 0.05 live)")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the middle of the demo
    live = sys.stdout.isatty()
    width = shutil.get_terminal_size((120, 40)).columns if live else 120
    delay = args.delay if args.delay is not None else (0.05 if live else 0.0)
    print(f"prompt: {args.prompt!r}  ·  greedy  ·  max {args.max_new_tokens} new tokens  ·  loramux Engine, CPU\n")
    board = run(
        assets=args.assets, prompt=args.prompt, max_new_tokens=args.max_new_tokens, delay=delay, live=live, width=width
    )
    print("\n" + summary(board.steps, [s.label for s in board.streams]))
    print("\nThe adapters' text, read back through the inverse transform:")
    print("\n".join(read_back(board)))


if __name__ == "__main__":
    main()
