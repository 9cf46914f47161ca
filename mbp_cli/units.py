"""Memory sizes in words, '20GiB' to bytes and back, and fractions as percentages (stdlib
only)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """'20GiB' → 21474836480; '1.5GB' → 1500000000; a bare integer is bytes, from 1 MiB up (a
    smaller one is a unit left out: '24' meant 24GiB, not 24 bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match[2].lower() if match else ""
    if isinstance(value, bool) or not match or unit not in _UNITS or float(match[1]) <= 0:
        raise ValueError(f"{value!r} is not a memory size such as 512MiB, 20GiB or 1.5GB")
    if not unit and float(match[1]) < 2**20:
        raise ValueError(f"{value!r} has no unit, so it would be {match[1]} bytes; add one, "
                         f"e.g. {match[1]}GiB or {match[1]}MiB")
    return int(float(match[1]) * _UNITS[unit])


def format_percent(value: float | None) -> str:
    """0.9916 → '99.16%'."""
    return "-" if value is None else f"{100 * value:.2f}%"


def format_bytes(count: float | None) -> str:
    """1536 → '1.5 KiB'."""
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
