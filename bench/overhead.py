"""Overhead: time per target batch of mbp's loop against a minimal hand-written accumulation loop,
Accelerate and Lightning; same model, same micro-batch, same data in memory, on the CPU.

mbp, the hand loop and Accelerate take turns round by round; a ratio is the median of the
per-round ratios (back-to-back runs share the machine's state). Lightning runs its own loop, so
it is timed per optimizer step by a callback, in a block of its own, and its ratio is of medians.

    python bench/overhead.py [--rounds 60] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import interleaved_times, markdown_table, paired_ratio, quiet_peers, write_result

from mbp_cli.catalog.classification import cross_entropy
from mbp_cli.catalog.datasets import TensorPairs, digits
from mbp_cli.catalog.models import mlp, small_cnn
from mbp_cli.data.batching import MicroBatchPlan, micro_batch_loader
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.engine.model import spare_counting
from mbp_cli.run.target_batch import target_batch_step

CASES = [("small_cnn", 512, 32), ("small_cnn", 512, 8), ("mlp", 1024, 64)]


def build(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = (small_cnn() if name == "small_cnn" else mlp(hidden=256, depth=3)).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def target_batches(data: TensorPairs, target: int):
    plan = MicroBatchPlan(len(data), target, target, 0, True, 0, 10**6)
    return (torch.as_tensor(plan.target_batch_at(s)) for s in itertools.count())


def hand_loop(name, data, target, micro, device) -> Callable[[], None]:
    """The loop a careful user writes: sum-reduced loss over the batch's sample count."""
    model, optimizer = build(name, device)
    batches = target_batches(data, target)

    def step() -> None:
        indices = next(batches)
        for start in range(0, len(indices), micro):
            piece = indices[start:start + micro]
            x, y = data.inputs[piece].to(device), data.targets[piece].to(device)
            (F.cross_entropy(model(x), y, reduction="sum") / len(indices)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def mbp_loop(name, data, target, micro, device) -> Callable[[], None]:
    """mbp's path: seeded plan, micro-batch stream, target_batch_step, one step."""
    model, optimizer = build(name, device)
    plan = MicroBatchPlan(len(data), target, micro, 0, True, 0, 10**6)
    stream = iter(micro_batch_loader(data, plan, num_workers=0, pin_memory=False))
    loss = spare_counting(cross_entropy(), data)  # as `mbp train` builds it
    micro_step, steps = MicroStep(model, loss, device, torch.float32), itertools.count()

    def step() -> None:
        pieces = itertools.islice(stream, plan.micro_batches_per_step(next(steps)))
        target_batch_step(micro_step, pieces)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def accelerate_loop(name, data, target, micro, device) -> Callable[[], None]:
    """Accelerate's documented pattern: accumulate(), backward(), step() every micro-batch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=target // micro, sync_with_dataloader=False)
    accelerator = Accelerator(cpu=device.type == "cpu", gradient_accumulation_plugin=plugin)
    model, optimizer = accelerator.prepare(*build(name, device))
    batches = target_batches(data, target)

    def step() -> None:
        indices = next(batches)
        for start in range(0, len(indices), micro):
            piece = indices[start:start + micro]
            with accelerator.accumulate(model):
                x, y = data.inputs[piece].to(device), data.targets[piece].to(device)
                accelerator.backward(F.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return step


def lightning_step_seconds(name, data, target, micro, device, steps: int) -> float:
    """Median seconds per optimizer step of a Lightning Trainer with accumulate_grad_batches."""
    import lightning as L

    accumulate = target // micro
    net, _ = build(name, device)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, index):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
            if (index + 1) % accumulate == 0:
                self.marks.append(time.perf_counter())

    timer = StepTimer()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.inputs, data.targets), batch_size=micro,
        shuffle=True, drop_last=True)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=steps + 2,
                        accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(Module(), loader)
    gaps = [b - a for a, b in itertools.pairwise(timer.marks[1:])]  # the first includes warm-up
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    quiet_peers()
    device = torch.device(args.device)
    data = digits()
    rows = []
    for model_name, target, micro in CASES:
        contenders = {"hand loop": hand_loop, "mbp": mbp_loop, "Accelerate": accelerate_loop}
        times = interleaved_times(
            {label: make(model_name, data, target, micro, device)
             for label, make in contenders.items()}, args.rounds, device)
        medians = {label: statistics.median(values) for label, values in times.items()}
        ratios = {label: paired_ratio(times, label, "hand loop") for label in times}
        medians["Lightning"] = lightning_step_seconds(model_name, data, target, micro, device,
                                                      args.rounds)
        ratios["Lightning"] = medians["Lightning"] / medians["hand loop"]  # not paired
        rows.append({"model": model_name, "target_batch": target, "micro_batch": micro,
                     "seconds": medians, "ratio_to_hand_loop": ratios})
        print(model_name, target, micro, {k: f"{v * 1e3:.1f} ms" for k, v in medians.items()})
    labels = ["hand loop", "mbp", "Accelerate", "Lightning"]
    table = markdown_table(
        ["model", "target / micro", *(f"{label} (ms)" for label in labels),
         "mbp / hand", "Accelerate / hand", "Lightning / hand"],
        [[r["model"], f"{r['target_batch']} / {r['micro_batch']}",
          *(f"{r['seconds'][label] * 1e3:.1f}" for label in labels),
          *(f"{r['ratio_to_hand_loop'][label]:.3f}" for label in labels[1:])] for r in rows])
    print(table)
    write_result(f"overhead-{device.type}", {"rounds": args.rounds, "device": str(device),
                                             "rows": rows, "table": table})


if __name__ == "__main__":
    main()
