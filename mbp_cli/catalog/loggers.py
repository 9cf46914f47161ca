"""Loggers of the tools people already use, each one more event sink named in `train.log`.

A logger is a class taking (run folder, the step the run starts from) and called with every
event; `close()` ends it. To add one (MLflow, W&B offline), write its class and name it in
LOGGERS: nothing else changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mbp_cli import events as ev
from mbp_cli.errors import UsageError


class TensorBoardLog:
    """Scalars for TensorBoard under RUN/tensorboard, as metrics.jsonl has them (its step is
    the optimizer step). A resumed run discards what the first part logged after its
    checkpoint (TensorBoard's purge_step), so no step is there twice."""

    folder = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UsageError("train.log: tensorboard needs the tensorboard package: "
                             "pip install 'mbp-cli[tensorboard]'") from exc
        self._writer_class = SummaryWriter
        self.path, self.start_step = run_dir / self.folder, start_step
        self.writer: Any = None
        self.oom_retries = 0

    def __call__(self, event: ev.Event) -> None:
        scalars = self.scalars(event)
        if not scalars:
            return
        if self.writer is None:  # the run folder exists once a step has succeeded
            # Steps after the checkpoint are logged again: drop the first part's.
            purge = self.start_step + 1 if self.start_step else None
            self.writer = self._writer_class(str(self.path), purge_step=purge)
        step = event.step
        for name, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def scalars(self, event: ev.Event) -> dict[str, float | None]:
        """The scalars an event gives, by TensorBoard tag."""
        if isinstance(event, ev.Step):
            return {"train/loss": event.loss, "train/lr": event.lr,
                    "train/samples_per_second": event.samples_per_second,
                    "train/peak_memory_bytes": event.peak_memory_bytes,
                    "train/micro_batch": event.micro_batch,
                    "train/accumulation_steps": event.micro_batches,
                    "train/grad_norm": event.grad_norm}
        if isinstance(event, ev.Eval):
            return {"eval/loss": event.eval_loss, "eval/accuracy": event.eval_accuracy}
        if isinstance(event, ev.OutOfMemory):
            self.oom_retries += 1
            return {"train/micro_batch": event.micro_batch,
                    "train/oom_retries": self.oom_retries}
        return {}

    def close(self) -> None:
        """Write out and close the event file."""
        if self.writer is not None:
            self.writer.close()


LOGGERS = {"tensorboard": TensorBoardLog}
