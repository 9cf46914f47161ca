"""Every random generator a step can draw from, saved and put back (checkpoints, the probe)."""

from __future__ import annotations

import random
import sys
from typing import Any

import torch


def rng_states() -> dict[str, Any]:
    """Every random generator a step can draw from: Python's, torch's CPU and CUDA, numpy's."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, position, has_gauss, cached = numpy.random.get_state()
        states["numpy"] = (name, torch.from_numpy(keys.astype("int64")), position, has_gauss,
                           cached)
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put every random generator back where `rng_states` found it."""
    random.setstate(_as_tuples(states["python"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy

        name, keys, position, has_gauss, cached = states["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss,
                                cached))


def _as_tuples(value: Any) -> Any:
    """random.setstate wants tuples; a checkpoint may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
