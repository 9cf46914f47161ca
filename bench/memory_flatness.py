"""Memory flatness: peak memory of one training step against the target batch, 64 to 8192,
the plain full batch against mbp with a fixed micro-batch of 32 (small CNN, 8×8 inputs).

On a CPU the figure is the tensor tracker's (live tensor storage, 512-byte blocks); on CUDA it is
`max_memory_allocated`. Writes bench/results/memory-flatness[-cuda].{json,png}.

    python bench/memory_flatness.py [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import RESULTS, markdown_table, write_result

from mbp_cli.catalog.classification import cross_entropy
from mbp_cli.catalog.datasets import synthetic
from mbp_cli.catalog.models import small_cnn
from mbp_cli.data.batching import MicroBatchPlan, micro_batch_loader
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.memory.tracker import StorageTracker, training_state_tensors
from mbp_cli.run.target_batch import target_batch_step

TARGETS = [64, 128, 256, 512, 1024, 2048, 4096, 8192]
MICRO = 32


def step_peak(target: int, micro: int, device: torch.device) -> int:
    """Peak bytes of one optimizer step over `target` samples streamed `micro` at a time."""
    torch.manual_seed(0)
    data = synthetic(num_samples=target)
    model = small_cnn().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # mbp's own data path: the seeded plan and the micro-batch stream (fresh tensors per piece).
    plan = MicroBatchPlan(target, target, micro, seed=0, drop_last=True, start_step=0,
                          stop_step=1)
    pieces = micro_batch_loader(data, plan, num_workers=0, pin_memory=False)
    tracker = StorageTracker() if device.type == "cpu" else None
    if tracker is not None:
        tracker.register(training_state_tensors(model, optimizer))
    else:
        torch.cuda.reset_peak_memory_stats(device)
    with tracker if tracker is not None else contextlib.nullcontext():
        target_batch_step(MicroStep(model, cross_entropy(), device, torch.float32), pieces)
        optimizer.step()
    if tracker is not None:
        return tracker.peak_bytes
    return int(torch.cuda.max_memory_allocated(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [{"target_batch": t, "full_batch_bytes": step_peak(t, t, device),
             "mbp_bytes": step_peak(t, MICRO, device)} for t in TARGETS]
    mib = 2**20
    table = markdown_table(
        ["target batch", "full batch (MiB)", f"mbp, micro-batch {MICRO} (MiB)"],
        [[r["target_batch"], f"{r['full_batch_bytes'] / mib:.1f}",
          f"{r['mbp_bytes'] / mib:.2f}"] for r in rows])
    print(table)
    plot(rows, device)
    write_result(result_name(device), {"device": str(device), "micro_batch": MICRO,
                                     "source": "tracked tensors" if device.type == "cpu"
                                     else "cuda max_memory_allocated",
                                     "rows": rows, "table": table})


def result_name(device: torch.device) -> str:
    """memory-flatness (the CPU's, in the README) or memory-flatness-cuda."""
    return "memory-flatness" if device.type == "cpu" else f"memory-flatness-{device.type}"


def plot(rows: list[dict], device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    targets = [r["target_batch"] for r in rows]
    axes.plot(targets, [r["full_batch_bytes"] / 2**20 for r in rows], "o-",
              label="full batch in one piece")
    axes.plot(targets, [r["mbp_bytes"] / 2**20 for r in rows], "s-",
              label=f"mbp, micro-batch {MICRO}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("target batch")
    axes.set_ylabel("peak memory of one step (MiB)")
    axes.set_title(f"small CNN, one training step ({device.type}, "
                   f"{'tracked tensors' if device.type == 'cpu' else 'CUDA allocator'})")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    figure.savefig(RESULTS / f"{result_name(device)}.png", dpi=110)


if __name__ == "__main__":
    main()
