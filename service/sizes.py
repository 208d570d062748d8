"""One syntax for every memory size on the command line: ``512MiB``, ``2GiB``, ``1.5GB``, ``4096`` (bytes).

Binary units (KiB, MiB, GiB, TiB: powers of 1024) and decimal ones (KB, MB, GB, TB: powers of 1000), case
insensitive, an optional space before the unit; a bare number is bytes. Sizes are whole bytes, at least 0.
"""

from __future__ import annotations

import re

UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes for ``text``; ValueError saying what is accepted otherwise."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(
            f"{text!r} is not a size: a number with an optional unit B, KiB, MiB, GiB, TiB, KB, MB, GB, TB"
        )
    return int(float(match.group(1)) * UNITS[unit])


def format_size(n: int) -> str:
    """The largest binary unit that shows ``n`` bytes with at most one decimal (for messages and logs)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + unit
    return f"{n}B"
