"""What every benchmark shares: where results go, the machine they came from, fair timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import mbp_cli

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent.parent))  # the tests' helpers, run from anywhere


def quiet_peers() -> None:
    """Silence the peers' start-up chatter so the tables stay readable."""
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cpu_name() -> str:
    """The processor's model name where Linux tells it, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def machine() -> dict[str, Any]:
    """The machine and versions a result was measured with."""
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "mbp": mbp_cli.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>.json with the machine attached."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload},
                               indent=2) + "\n")
    print(f"wrote {path}")
    return path


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds of each contender's call, round by round, contenders taking turns."""
    times: dict[str, list[float]] = {label: [] for label in steps}
    for step in steps.values():  # warm-up
        step()
    order = list(steps.items())
    for round_index in range(rounds):
        # Alternate who goes first: caches and clocks favour nobody.
        for label, step in order if round_index % 2 == 0 else order[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - started)
    return times


def paired_ratio(times: dict[str, list[float]], label: str, baseline: str) -> float:
    """Median over rounds of label's time / baseline's time in the same round: the machine's
    drift between rounds falls out, as both ran back to back."""
    return statistics.median(a / b for a, b in zip(times[label], times[baseline], strict=True))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table, numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(header))) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
