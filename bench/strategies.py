"""Memory strategies weighed by the probe: for each combination (none, bf16, activation
checkpointing, activation offload, and the useful pairs) the largest micro-batch within the
budget and the measured time per target batch.

- ResNet-18 on 3×64×64 images under a tracked 400 MiB budget (CPU), or on 224×224 images under
  the GPU's own budget (`--device cuda`).
- ResNet-50 at 224×224 estimated on fake tensors for a 24 GiB and an 80 GiB GPU (target batch
  4096, so the largest micro-batch is never capped by it).

    python bench/strategies.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch
from common import markdown_table, write_result

from mbp_cli.memory.search import ProbeOptions
from mbp_cli.memory.weigh import probe_recipe
from mbp_cli.recipe.load import build_recipe
from mbp_cli.units import format_bytes

GiB, MiB = 2**30, 2**20


def recipe_for(model: str, side: int, target: int, device: str):
    problems: list[str] = []
    recipe = build_recipe({
        "model": {"name": model, "args": {"num_classes": 10}},
        "data": {"name": "FakeData", "args": {"size": 256, "image_size": [3, side, side]},
                 "input_shape": [3, side, side]},
        "optim": {"name": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
        "batch": {"target": target, "micro": "auto"},
        "train": {"steps": 1, "device": device}}, "strategies-bench", problems)
    assert not problems, problems
    return recipe


def rows_of(name: str, answer: dict) -> list[dict]:
    rows = []
    for row in answer["strategies"]:
        rows.append({"case": name, "strategies": row["label"], "fits": row["fits"],
                     "note": row["note"], "chosen": row["label"] == answer["choice_label"],
                     "largest_micro_batch": row.get("largest_micro_batch"),
                     "micro_batch": row.get("micro_batch"),
                     "accumulation_steps": row.get("accumulation_steps"),
                     "peak_bytes": row.get("verified_peak_bytes"),
                     "seconds_per_target_batch": row.get("seconds_per_target_batch")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    if device.type == "cuda":
        measured = ("resnet18 224×224, cuda", recipe_for("resnet18", 224, 4096, "cuda"),
                    ProbeOptions(device))
    else:
        measured = ("resnet18 64×64, tracked 400 MiB", recipe_for("resnet18", 64, 512, "cpu"),
                    ProbeOptions(device, budget_bytes=400 * MiB))
    name, recipe, options = measured
    print(f"{name} …", flush=True)
    rows += rows_of(name, probe_recipe(recipe, options, every_strategy=True).to_dict())
    for memory in (24, 80):
        name = f"resnet50 224×224, estimate {memory} GiB"
        print(f"{name} …", flush=True)
        options = ProbeOptions(None, estimate=True, device_memory_bytes=memory * GiB)
        answer = probe_recipe(recipe_for("resnet50", 224, 4096, "cpu"), options,
                              every_strategy=True).to_dict()
        rows += rows_of(name, answer)

    def seconds(row: dict) -> str:
        value = row["seconds_per_target_batch"]
        return f"{value:.2f}" if value is not None else "-"

    table = markdown_table(
        ["case", "strategies", "largest micro-batch", "split", "peak", "s / target batch"],
        [[r["case"], r["strategies"] + (" (chosen)" if r["chosen"] else ""),
          r["largest_micro_batch"] if r["fits"] else r["note"],
          f"{r['micro_batch']} × {r['accumulation_steps']}" if r["fits"] else "-",
          format_bytes(r["peak_bytes"]) if r["fits"] else "-", seconds(r)] for r in rows])
    print(table)
    write_result(f"strategies-{device.type}", {"device": str(device), "rows": rows,
                                               "table": table})


if __name__ == "__main__":
    main()
