"""Exactness: relative error of each tool's accumulated gradient against the full batch.

Splits even and uneven (64/16, 70/16, 100/16, 10/4) on the embedded digits, and a token loss with
padding (tiny_lm on synthetic_tokens). float64, so float rounding sits near 1e-16 and anything
above it is the method's own error. Contenders: mbp, the common hand loop (each micro-batch's mean
loss divided by the number of micro-batches), Accelerate's `accumulate`, Lightning's
`accumulate_grad_batches`, and the MBP authors' `mbp-pytorch`.

    python bench/exactness.py
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import markdown_table, quiet_peers, write_result

from mbp_cli.catalog.classification import cross_entropy
from mbp_cli.catalog.datasets import digits, synthetic_tokens
from mbp_cli.catalog.models import small_cnn, tiny_lm
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.run.target_batch import target_batch_step

CPU = torch.device("cpu")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def pieces(x, y, micro):
    return [(x[s:s + micro], y[s:s + micro]) for s in range(0, len(y), micro)]


def full_batch(model, x, y, loss: Loss, micro: int) -> torch.Tensor:
    loss(model(x), y).backward()
    return flat_grad(model)


def with_mbp(model, x, y, loss: Loss, micro: int) -> torch.Tensor:
    target_batch_step(MicroStep(model, cross_entropy(), CPU, torch.float64), pieces(x, y, micro))
    return flat_grad(model)


def hand_loop(model, x, y, loss: Loss, micro: int) -> torch.Tensor:
    parts = pieces(x, y, micro)
    for xs, ys in parts:
        (loss(model(xs), ys) / len(parts)).backward()
    return flat_grad(model)


def with_accelerate(model, x, y, loss: Loss, micro: int) -> torch.Tensor:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    parts = pieces(x, y, micro)
    plugin = GradientAccumulationPlugin(num_steps=len(parts), sync_with_dataloader=False)
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=plugin)
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for xs, ys in parts:
        with accelerator.accumulate(model):
            accelerator.backward(loss(model(xs), ys))
    return flat_grad(model)


def with_lightning(model, x, y, loss: Loss, micro: int) -> torch.Tensor:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.grad = model, None

        def training_step(self, batch, index):
            return loss(self.net(batch[0]), batch[1])

        def on_before_optimizer_step(self, optimizer) -> None:
            self.grad = flat_grad(self.net).clone()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=micro)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, precision="64-true",
                        accumulate_grad_batches=math.ceil(len(y) / micro), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    return module.grad


def with_mbp_pytorch(model, x, y, loss: Loss, micro: int) -> torch.Tensor:
    import mbp  # the MBP authors' package (mbp-pytorch)

    @mbp.apply(["xs", "ys"], micro, "cpu")
    def train_fn(net, xs, ys):
        return loss(net(xs), ys)

    train_fn(model, xs=x, ys=y)
    return flat_grad(model)


CONTENDERS = {"mbp": with_mbp, "hand loop (÷ micro-batches)": hand_loop,
              "Accelerate accumulate": with_accelerate,
              "Lightning accumulate_grad_batches": with_lightning,
              "mbp-pytorch": with_mbp_pytorch}


def cases():
    torch.manual_seed(0)
    images = digits()
    cnn = small_cnn(width=8).double()
    for target, micro in [(64, 16), (70, 16), (100, 16), (10, 4)]:
        yield (f"images {target}/{micro}", cnn, images.inputs[:target].double(),
               images.targets[:target], F.cross_entropy, micro)
    tokens = synthetic_tokens(num_samples=100, vocab_size=16, min_len=2, max_len=12)
    lm = tiny_lm(vocab_size=16, dim=16).double()

    def token_loss(logits, targets):
        return F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1), ignore_index=-100)

    for target, micro in [(64, 16), (70, 16)]:
        yield (f"tokens with padding {target}/{micro}", lm, tokens.inputs[:target],
               tokens.targets[:target], token_loss, micro)


def main() -> None:
    quiet_peers()
    rows = []
    for name, model, x, y, loss, micro in cases():
        expected = full_batch(copy.deepcopy(model), x, y, loss, micro)
        errors = {label: float((run(copy.deepcopy(model), x, y, loss, micro) - expected).norm()
                               / expected.norm()) for label, run in CONTENDERS.items()}
        rows.append({"case": name, "relative_error": errors})
        print(name, {k: f"{v:.1e}" for k, v in errors.items()})
    table = markdown_table(["case", *CONTENDERS],
                           [[r["case"], *(f"{r['relative_error'][c]:.1e}" for c in CONTENDERS)]
                            for r in rows])
    print(table)
    write_result("exactness", {"dtype": "float64", "rows": rows, "table": table})


if __name__ == "__main__":
    main()
