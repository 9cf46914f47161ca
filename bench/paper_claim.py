"""The paper's claim on data that runs here: a target batch trained as micro-batches trains as
well as the same batch in one piece, and trains where the one piece does not fit.

1. The embedded digits, small CNN (no BatchNorm), SGD with momentum, target batch 512: micro-batches
   of 32 against the whole 512 at once, 3 seeds; learning curves overlaid, final accuracy.
2. A simulated device of 8 MiB: the plain PyTorch full-batch step runs out of memory; mbp with
   `batch.micro: auto` trains the same target batch of 512 on it.

    python bench/paper_claim.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, markdown_table, write_result

from mbp_cli.catalog.datasets import digits
from mbp_cli.catalog.models import small_cnn
from mbp_cli.commands.train import train
from mbp_cli.memory.tracker import SimulatedOutOfMemoryError, StorageTracker, training_state_tensors
from mbp_cli.recipe.load import load_recipe
from mbp_cli.run.start import RunOptions

RECIPE = Path(__file__).parent.parent / "recipes" / "digits.yaml"
DEVICE_BYTES = 8 * 2**20


def run(overrides: list[str], memory: StorageTracker | None = None) -> dict:
    """Train the digits recipe with overrides; the curves and the summary."""
    recipe = load_recipe(RECIPE, ["train.eval_every=10", "train.checkpoint_every=0",
                                  "train.device=cpu", *overrides])
    events: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        summary = train(recipe, RunOptions(Path(folder) / "run", simulated_memory=memory),
                        [lambda event: events.append(event.to_dict())])
    return {"summary": summary,
            "loss": [e["loss"] for e in events if e["event"] == "step"],
            "eval": [(e["step"], e["eval_accuracy"]) for e in events if e["event"] == "eval"]}


def loss_gap(micro: dict, whole: dict) -> dict:
    """How far the two runs' training losses drift apart, relative, step by step."""
    gaps = [abs(a - b) / abs(b) for a, b in zip(micro["loss"], whole["loss"], strict=True)]
    first = next((step for step, gap in enumerate(gaps, 1) if gap > 1e-3), None)
    return {"largest": max(gaps), "largest_first_20_steps": max(gaps[:20]),
            "first_step_over_0.1%": first,
            "accuracies": [micro["summary"]["eval_accuracy"], whole["summary"]["eval_accuracy"]]}


def plain_full_batch_fits(device_bytes: int) -> tuple[bool, str]:
    """One hand-written PyTorch step on the whole target batch of 512, on the simulated device."""
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = digits()
    device = StorageTracker(capacity_bytes=device_bytes)
    device.register(training_state_tensors(model, optimizer))
    try:
        with device:
            inputs, targets = data.inputs[:512].clone(), data.targets[:512].clone()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    except SimulatedOutOfMemoryError as exc:
        return False, str(exc).split(" (while")[0]
    return True, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"micro-batches of 32": [], "one piece of 512": []}
    for seed in range(args.seeds):
        runs["micro-batches of 32"].append(run([f"seed={seed}", "batch.micro=32"]))
        runs["one piece of 512"].append(run([f"seed={seed}", "batch.micro=512"]))
        print(seed, {k: v[-1]["summary"]["eval_accuracy"] for k, v in runs.items()})
    gaps = [loss_gap(a, b) for a, b in zip(*runs.values(), strict=True)]
    worst = max(range(args.seeds), key=lambda seed: gaps[seed]["largest"])
    float64 = loss_gap(run([f"seed={worst}", "batch.micro=32", "train.dtype=float64"]),
                       run([f"seed={worst}", "batch.micro=512", "train.dtype=float64"]))
    print("float32 gaps", gaps, f"seed {worst} in float64", float64)
    fits, message = plain_full_batch_fits(DEVICE_BYTES)
    on_small_device = run(["seed=0", "batch.micro=auto"], StorageTracker(DEVICE_BYTES))
    small = on_small_device["summary"]
    print("plain full batch on 8 MiB:", "fits" if fits else message)
    print("mbp on 8 MiB:", small["micro_batch"], small["eval_accuracy"])

    rows = [{"run": label, "accuracies": [r["summary"]["eval_accuracy"] for r in results],
             "mean": statistics.mean(r["summary"]["eval_accuracy"] for r in results)}
            for label, results in runs.items()]
    table = markdown_table(
        ["target batch 512 as", *(f"seed {s}" for s in range(args.seeds)), "mean accuracy"],
        [[r["run"], *(f"{a:.2%}" for a in r["accuracies"]), f"{r['mean']:.2%}"] for r in rows])
    table += "\n\n" + markdown_table(
        ["seed", "dtype", "largest loss gap, steps 1–20", "largest loss gap",
         "first step > 0.1% apart", "accuracy: 32 / 512"],
        [[seed, dtype, f"{g['largest_first_20_steps']:.1e}", f"{g['largest']:.1e}",
          g["first_step_over_0.1%"] or "never",
          " / ".join(f"{a:.2%}" for a in g["accuracies"])]
         for seed, dtype, g in [*((i, "float32", g) for i, g in enumerate(gaps)),
                                (worst, "float64", float64)]])
    table += "\n\n" + markdown_table(
        ["on a simulated 8 MiB device", "result"],
        [["plain PyTorch, full batch of 512", "fits" if fits else f"out of memory: {message}"],
         ["mbp, `micro: auto`", f"micro-batch {small['micro_batch']} × "
          f"{small['accumulation_steps']}, peak {small['peak_memory_bytes'] / 2**20:.1f} MiB, "
          f"accuracy {small['eval_accuracy']:.2%} (seed 0)"]])
    print(table)
    plot(runs, on_small_device)
    write_result("paper-claim", {
        "recipe": "recipes/digits.yaml", "seeds": args.seeds, "rows": rows,
        "loss_gaps_float32": gaps, "loss_gap_float64": {"seed": worst, **float64},
        "curves_seed0": {k: {"loss": v[0]["loss"], "eval": v[0]["eval"]} for k, v in runs.items()},
        "small_device": {"capacity_bytes": DEVICE_BYTES, "plain_full_batch_fits": fits,
                         "plain_full_batch_error": message, "mbp_micro_batch": small["micro_batch"],
                         "mbp_peak_bytes": small["peak_memory_bytes"],
                         "mbp_accuracy": small["eval_accuracy"]},
        "table": table})


def plot(runs: dict[str, list[dict]], small: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, eval_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"micro-batches of 32": "-", "one piece of 512": "--"}
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for label, results in runs.items():
        for seed, result in enumerate(results):
            style = dict(linestyle=styles[label], color=colours[seed % len(colours)], alpha=0.8,
                         label=f"{label}, seed {seed}")
            loss_axes.plot(range(1, len(result["loss"]) + 1), result["loss"], **style)
            steps, accuracy = zip(*result["eval"], strict=True)
            eval_axes.plot(steps, accuracy, **style)
    steps, accuracy = zip(*small["eval"], strict=True)
    eval_axes.plot(steps, accuracy, ":", color="black",
                   label=f"mbp on an 8 MiB device (micro {small['summary']['micro_batch']})")
    loss_axes.set_yscale("log")
    loss_axes.set(xlabel="optimizer step", ylabel="training loss",
                  title="digits, small CNN, target batch 512")
    eval_axes.set(xlabel="optimizer step", ylabel="held-out accuracy", ylim=(0.5, 1.0),
                  title="held-out accuracy")
    eval_axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    figure.savefig(RESULTS / "paper-claim.png", dpi=110)


if __name__ == "__main__":
    main()
