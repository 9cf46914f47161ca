"""Time per target batch: mbp's loop against a minimal hand-written accumulation loop.

Same model, same micro-batch, same data in memory; the contenders take turns round by round
so that machine noise falls on both alike. Prints a table and writes bench/results/overhead-*.json.

    python bench/overhead.py [--rounds 25] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

import mbp_cli
from mbp_cli.accumulate import accumulate_gradients
from mbp_cli.batching import MicroBatchPlan, micro_batch_loader
from mbp_cli.datasets import TensorPairs, digits
from mbp_cli.losses import cross_entropy
from mbp_cli.models import mlp, small_cnn

RESULTS = Path(__file__).parent / "results"


def hand_loop(model, optimizer, data: TensorPairs, batches, micro: int, device) -> Callable:
    """The loop a careful user writes by hand: sum-reduced loss over the batch's sample count."""

    def step() -> None:
        indices = torch.as_tensor(next(batches))
        for start in range(0, len(indices), micro):
            piece = indices[start:start + micro]
            x, y = data.inputs[piece].to(device), data.targets[piece].to(device)
            (F.cross_entropy(model(x), y, reduction="sum") / len(indices)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def mbp_loop(model, optimizer, data: TensorPairs, target: int, micro: int, device) -> Callable:
    """mbp's path: seeded plan, DataLoader of micro-batches, accumulate_gradients, one step."""
    plan = MicroBatchPlan(len(data), target, micro, seed=0, drop_last=True, start_step=0,
                          stop_step=10**6)
    stream = iter(micro_batch_loader(data, plan, num_workers=0, pin_memory=False))
    loss_fn = cross_entropy()
    steps = itertools.count()

    def step() -> None:
        pieces = itertools.islice(stream, plan.micro_batches_per_step(next(steps)))
        accumulate_gradients(model, pieces, loss_fn, device, torch.float32)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def contenders(name: str, target: int, micro: int, device) -> dict[str, Callable]:
    data = digits()
    built = {}
    for label in ("hand loop", "mbp"):
        torch.manual_seed(0)
        model = (small_cnn() if name == "small_cnn" else mlp(hidden=256, depth=3)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if label == "hand loop":
            plan = MicroBatchPlan(len(data), target, micro, 0, True, 0, 10**6)
            batches = (plan.target_batch_at(s) for s in itertools.count())
            built[label] = hand_loop(model, optimizer, data, batches, micro, device)
        else:
            built[label] = mbp_loop(model, optimizer, data, target, micro, device)
    return built


def measure(steps: dict[str, Callable], rounds: int, device) -> dict[str, float]:
    """Median seconds per target batch of each contender, interleaved round by round."""
    times: dict[str, list[float]] = {label: [] for label in steps}
    for step in steps.values():  # warm-up
        step()
    order = list(steps.items())
    for round_index in range(rounds):
        # Alternate who goes first: caches and clocks favour neither.
        for label, step in order if round_index % 2 == 0 else order[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - started)
    return {label: statistics.median(values) for label, values in times.items()}


def cpu_name() -> str:
    """The processor's model name where Linux tells it, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for model_name, target, micro in [("small_cnn", 512, 32), ("small_cnn", 512, 8),
                                      ("mlp", 1024, 64)]:
        medians = measure(contenders(model_name, target, micro, device), args.rounds, device)
        rows.append({"model": model_name, "target_batch": target, "micro_batch": micro,
                     "hand_loop_seconds": medians["hand loop"], "mbp_seconds": medians["mbp"],
                     "ratio": medians["mbp"] / medians["hand loop"]})
    print(f"{'model':<10} {'target':>6} {'micro':>5} {'hand loop':>10} {'mbp':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<10} {r['target_batch']:>6} {r['micro_batch']:>5} "
              f"{r['hand_loop_seconds'] * 1e3:>8.1f}ms {r['mbp_seconds'] * 1e3:>8.1f}ms "
              f"{r['ratio']:>6.3f}")
    result = {
        "benchmark": "overhead", "rounds": args.rounds, "device": str(device),
        "machine": cpu_name(), "cores": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "mbp": mbp_cli.__version__, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"overhead-{device.type}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
