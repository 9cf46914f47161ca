"""Files written by torch.save, read back as tensors only (no code runs), with a plain reason
where they cannot be."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch


def load_tensors(path: Path | str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, or ValueError saying why not."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, garbled or foreign file fails in many ways
        raise ValueError(_why_unreadable(Path(path), exc)) from exc


def _why_unreadable(path: Path, exc: Exception) -> str:
    if not path.is_file():
        return "no such file"
    if not zipfile.is_zipfile(path):
        return "not a file written by torch.save, or one cut short"
    if "Weights only load failed" in str(exc):
        return "it holds Python objects besides tensors, and mbp loads tensors only (so that " \
               "no code in the file runs)"
    return " ".join(str(exc).split())[:200]
