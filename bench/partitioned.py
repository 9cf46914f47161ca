"""Partitioned training with synthetic intermediate labels, measured against conventional
training of the same model on the same data, steps and optimizer.

1. The published shape: a 6-layer fully connected network cut into two parts, on the embedded
   digits (and on MNIST where it can be downloaded; skipped with a note otherwise).
2. A small CNN cut between its two convolutions, where the mode may well lose.

For each, 3 seeds of each mode: held-out accuracy of the (composed) model, the peak of tracked
tensor memory (the largest part's against the whole model's) and the wall time.

    python bench/partitioned.py [--seeds 3] [--steps 200] [--mnist-root DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import markdown_table, write_result

from mbp_cli.commands.train import train
from mbp_cli.errors import MbpError
from mbp_cli.memory.tracker import StorageTracker
from mbp_cli.recipe.load import load_recipe
from mbp_cli.run.start import RunOptions

TRACKED = 2**40  # a simulated device too large to run out: it only counts tensor bytes
MLP6 = {"name": "mlp", "args": {"in_features": 64, "hidden": 256, "depth": 5}}  # 6 Linear
CASES = {
    # Sequential indices: 0 Flatten, 1 Linear, 2 ReLU, …; 6 is the ReLU after the third Linear
    "mlp6-digits": {"model": MLP6, "data": {"name": "digits", "args": {}}, "at": [6]},
    # 0 Conv, 1 ReLU, 2 Conv, 3 ReLU, …: cut between the two convolutions' activations
    "cnn-digits": {"model": {"name": "small_cnn", "args": {"num_classes": 10}},
                   "data": {"name": "digits", "args": {}}, "at": [3]},
}


def recipe(case: dict[str, Any], seed: int, steps: int, partitioned: bool) -> dict[str, Any]:
    """The digits recipe's optimizer and schedule on the case's model and data."""
    train_spec: dict[str, Any] = {"steps": steps, "eval_every": 0, "checkpoint_every": 0,
                                  "device": "cpu"}
    if partitioned:
        train_spec["partition"] = {"at": case["at"], "labels": {"noise": 0.1, "seed": seed}}
    return {"name": "bench", "seed": seed, "model": case["model"], "data": case["data"],
            "batch": {"target": 256, "micro": 32},
            "optim": {"name": "AdamW", "args": {"lr": 0.003, "weight_decay": 1e-4}},
            "schedule": {"name": "cosine", "warmup_steps": 10},
            "loss": {"name": "cross_entropy", "args": {"label_smoothing": 0.1}},
            "train": train_spec}


def run(spec: dict[str, Any], tracked: bool = False) -> dict[str, Any]:
    """Train one recipe (its tensors tracked, where asked: slower); its summary."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(yaml.safe_dump(spec))
        memory = StorageTracker(TRACKED) if tracked else None
        options = RunOptions(Path(folder) / "run", simulated_memory=memory)
        return train(load_recipe(path), options, [])


def measure(case: dict[str, Any], seeds: int, steps: int) -> dict[str, Any]:
    """Both modes, seed by seed: accuracy and wall time untracked; the peak of tracked tensor
    memory from two more steps each (it is the same every step)."""
    modes: dict[str, Any] = {"conventional": [], "partitioned": []}
    for mode in list(modes):
        summary = run(recipe(case, 0, 2, mode == "partitioned"), tracked=True)
        parts = (summary.get("partition") or {}).get("parts", [])
        modes[f"{mode}_peak"] = {"peak_memory_bytes": summary["peak_memory_bytes"],
                                 "part_peaks_bytes": [p["peak_memory_bytes"] for p in parts]}
    for seed in range(seeds):
        for mode in ("conventional", "partitioned"):
            summary = run(recipe(case, seed, steps, mode == "partitioned"))
            parts = (summary.get("partition") or {}).get("parts", [])
            modes[mode].append({
                "seed": seed, "eval_accuracy": summary["eval_accuracy"],
                "part_eval_losses": [p["eval_loss"] for p in parts],
                "part_wall_seconds": [p["wall_seconds"] for p in parts],
                "wall_seconds": summary["wall_seconds"]})
            print(f"{mode:>12} seed {seed}: {100 * summary['eval_accuracy']:.2f}%  "
                  f"{summary['wall_seconds']:.1f} s", flush=True)
    return modes


def side_by_side(case: dict[str, Any], steps: int) -> dict[str, Any]:
    """Seed 0 partitioned with one process per part (`mbp train --nproc 2`, gloo)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe(case, 0, steps, True)))
        subprocess.run([sys.executable, "-m", "mbp_cli", "train", str(path), "--out",
                        f"{folder}/run", "--nproc", "2", "--quiet"], check=True,
                       cwd=Path(__file__).parent.parent)
        summary = json.loads(Path(f"{folder}/run/summary.json").read_text())
    print(f"side by side seed 0: {100 * summary['eval_accuracy']:.2f}%  "
          f"{summary['wall_seconds']:.1f} s", flush=True)
    return {"eval_accuracy": summary["eval_accuracy"], "wall_seconds": summary["wall_seconds"]}


def mnist_case(root: str) -> dict[str, Any] | None:
    """The MLP on MNIST (28×28 inputs) where torchvision can load or download it, else None."""
    import torchvision

    try:
        torchvision.datasets.MNIST(root, train=True, download=True)
    except Exception as exc:  # no network, a mirror down: say so and go on
        print(f"MNIST skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None
    model = {"name": "mlp", "args": {"in_features": 784, "hidden": 256, "depth": 5}}
    return {"model": model, "at": [6],
            "data": {"name": "MNIST", "args": {"root": root, "download": True}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (per part)")
    parser.add_argument("--mnist-root", default="data")
    args = parser.parse_args()
    cases = dict(CASES)
    notes = []
    found = mnist_case(args.mnist_root)
    if found is None:
        notes.append("MNIST/EMNIST: not measured (the dataset could not be downloaded here)")
    else:
        cases["mlp6-mnist"] = found
    results, rows = {}, []
    for name, case in cases.items():
        print(f"{name}:")
        try:
            results[name] = measure(case, args.seeds, args.steps)
            results[name]["side_by_side"] = side_by_side(case, args.steps)
        except MbpError as exc:
            notes.append(f"{name}: not measured ({exc})")
            continue
        conventional, parted = results[name]["conventional"], results[name]["partitioned"]

        def mean(runs: list[dict[str, Any]], key: str) -> float:
            return statistics.mean(r[key] for r in runs)

        accuracy = [[100 * r["eval_accuracy"] for r in runs] for runs in (conventional, parted)]
        whole_peak = results[name]["conventional_peak"]["peak_memory_bytes"]
        part_peak = results[name]["partitioned_peak"]["peak_memory_bytes"]
        rows.append([
            name, f"{statistics.mean(accuracy[0]):.2f} ({min(accuracy[0]):.2f}–"
                  f"{max(accuracy[0]):.2f})",
            f"{statistics.mean(accuracy[1]):.2f} ({min(accuracy[1]):.2f}–"
            f"{max(accuracy[1]):.2f})",
            f"{whole_peak / 2**20:.2f}", f"{part_peak / 2**20:.2f}",
            f"{part_peak / whole_peak:.2f}",
            f"{mean(conventional, 'wall_seconds'):.1f}", f"{mean(parted, 'wall_seconds'):.1f}",
            f"{results[name]['side_by_side']['wall_seconds']:.1f}"])
    table = markdown_table(
        ["case", "conventional accuracy % (min–max)", "partitioned accuracy % (min–max)",
         "peak MiB whole", "peak MiB largest part", "ratio", "wall s conv.",
         "wall s parts in turn", "wall s side by side (seed 0)"], rows)
    print(table)
    for note in notes:
        print(note)
    write_result("partitioned", {"seeds": args.seeds, "steps_per_part": args.steps,
                                 "cases": results, "notes": notes, "table": table})


if __name__ == "__main__":
    main()
