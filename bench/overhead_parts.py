"""Where mbp's overhead goes: the hand loop of bench/overhead.py with one piece changed at a
time towards mbp's, each timed against the hand loop in the same rounds (contenders taking
turns; a ratio is the median of per-round ratios). A second copy of the hand loop shows the
noise floor.

    python bench/overhead_parts.py [--rounds 60] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import interleaved_times, markdown_table, paired_ratio, write_result
from overhead import CASES, build, hand_loop, mbp_loop, target_batches

from mbp_cli.catalog.classification import cross_entropy
from mbp_cli.catalog.datasets import TensorPairs, digits
from mbp_cli.data.batching import MicroBatchPlan, micro_batch_loader
from mbp_cli.engine.micro_step import MicroStep


def with_mbps_data(name, data, target, micro, device) -> Callable[[], None]:
    """The hand loop's step on mbp's micro-batch stream."""
    model, optimizer = build(name, device)
    plan = MicroBatchPlan(len(data), target, micro, 0, True, 0, 10**6)
    stream, steps = iter(micro_batch_loader(data, plan, 0, pin_memory=False)), itertools.count()

    def step() -> None:
        for x, y in itertools.islice(stream, plan.micro_batches_per_step(next(steps))):
            (F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")
             / target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def divided_once(forward: str) -> Callable[..., Callable[[], None]]:
    """The hand loop backpropagating loss sums and dividing the gradients once per target
    batch, as mbp does; `forward` says what else each micro-batch runs: nothing, the item
    count (`target != ignore_index`, `count_nonzero`), or mbp's whole micro-step."""

    def make(name: str, data: TensorPairs, target: int, micro: int,
             device: torch.device) -> Callable[[], None]:
        model, optimizer = build(name, device)
        batches = target_batches(data, target)
        micro_step = MicroStep(model, cross_entropy(), device, torch.float32)  # it counts

        def step() -> None:
            indices = next(batches)
            for start in range(0, len(indices), micro):
                piece = indices[start:start + micro]
                x, y = data.inputs[piece].to(device), data.targets[piece].to(device)
                if forward == "micro-step":
                    loss_sum = micro_step((x, y)).loss_sum
                else:
                    loss_sum = F.cross_entropy(model(x), y, reduction="sum")
                    if forward == "count":
                        torch.count_nonzero(y != -100)
                loss_sum.backward()
            torch._foreach_div_([p.grad for p in model.parameters()], float(len(indices)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return make


CONTENDERS = {
    "hand loop (again)": hand_loop,
    "mbp's data path": with_mbps_data,
    "divided once": divided_once("nothing"),
    "divided once, items counted": divided_once("count"),
    "divided once, mbp's micro-step (counting)": divided_once("micro-step"),
    "mbp": mbp_loop,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = digits()
    rows = []
    for model_name, target, micro in CASES:
        steps = {"hand loop": hand_loop(model_name, data, target, micro, device)}
        steps |= {label: make(model_name, data, target, micro, device)
                  for label, make in CONTENDERS.items()}
        times = interleaved_times(steps, args.rounds, device)
        rows.append({"model": model_name, "target_batch": target, "micro_batch": micro,
                     "ratio_to_hand_loop": {label: paired_ratio(times, label, "hand loop")
                                            for label in CONTENDERS}})
        print(model_name, target, micro, {k: f"{v:.3f}" for k, v in
                                          rows[-1]["ratio_to_hand_loop"].items()})
    table = markdown_table(
        ["model", "target / micro", *CONTENDERS],
        [[r["model"], f"{r['target_batch']} / {r['micro_batch']}",
          *(f"{r['ratio_to_hand_loop'][label]:.3f}" for label in CONTENDERS)] for r in rows])
    print(table)
    write_result(f"overhead-parts-{device.type}", {"rounds": args.rounds, "device": str(device),
                                                   "rows": rows, "table": table})


if __name__ == "__main__":
    main()
