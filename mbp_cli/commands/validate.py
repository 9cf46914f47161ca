"""mbp validate's trial: the model built and one forward + loss + backward on two samples (real
ones where the dataset is here; nothing downloaded), a forward on the meta device where the model
is large."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from mbp_cli.catalog.datasets import is_stream
from mbp_cli.data.streaming import check_stream_recipe
from mbp_cli.engine.micro_step import explained_step_errors
from mbp_cli.engine.model import DTYPES, build_loss, build_model
from mbp_cli.engine.optim import build_optimizer
from mbp_cli.engine.samples import sample_batch
from mbp_cli.engine.setup import build_micro_step, resolve_device
from mbp_cli.engine.splits import check_target_batch
from mbp_cli.recipe.spec import Recipe
from mbp_cli.strategies.blocks import Blocks, BlockStrategies, check_blocks
from mbp_cli.strategies.choice import refuse_offload_here

LARGE_MODEL_PARAMETERS = 50_000_000  # above this the trial runs on the meta device


def trial_step(recipe: Recipe) -> str:
    """Build the model and run one forward + loss + backward on two samples, as training would;
    raise the training's own one-line errors. Returns what it saw, in words."""
    device = resolve_device(recipe.train.device)  # one not here is refused, as training would
    torch.manual_seed(recipe.seed)
    batch, train_set = sample_batch(recipe, 2)
    if train_set is not None and is_stream(train_set):
        check_stream_recipe(recipe)
    elif train_set is not None:
        check_target_batch(recipe, len(train_set))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    with meta:
        parameters = sum(p.numel() for p in build_model(recipe, cpu, is_fake=True).parameters())
    is_meta = parameters > LARGE_MODEL_PARAMETERS  # shapes only: nothing allocated
    device = meta if is_meta else cpu
    with device if is_meta else contextlib.nullcontext():
        model = build_model(recipe, device, is_fake=is_meta, with_weights=False)  # no download
    blocks = check_strategies(recipe, model, device)
    build_optimizer(recipe, model)  # arguments torch refuses, as training would find them
    step = build_micro_step(recipe, model, build_loss(recipe, model), device,
                            DTYPES[recipe.train.dtype])
    # One backward too, checkpointing's recompute included where asked: errors of the
    # backward (a model's cache refilled on the recompute, say) show before training
    checkpointed = BlockStrategies(blocks, checkpointing=True).apply() \
        if recipe.memory.checkpointing == "on" and not is_meta else None
    with explained_step_errors(True), torch.no_grad() if is_meta else contextlib.nullcontext():
        result = step(batch)
        if not is_meta:
            result.loss_sum.backward()
    if checkpointed is not None:
        checkpointed.remove()
    cut = check_cuts(recipe, model, batch, step)
    what = "one forward + loss" if is_meta else "one forward + loss + backward"
    where = "the meta device" if is_meta else f"{result.samples} samples"
    loss = "" if is_meta else \
        f", loss {float(result.loss_sum.detach()) / max(float(result.items), 1):.4g}"
    items = getattr(step.loss_fn, "items", None)  # loss: model's
    whose = f" (the model's own, a mean over {items})" if loss and items else ""
    return (f"{what} on {where}: output {tuple(result.output.shape)}{loss}{whose}; "
            f"{parameters:,} parameters{cut}")


def check_cuts(recipe: Recipe, model: torch.nn.Module, batch: Any, step: Any) -> str:
    """train.partition: the cut points, the codes' width and the targets checked as training
    checks them, on the trial batch; in words ('' without a partition)."""
    from mbp_cli.partition.build import check_codes_fit, run_parts
    from mbp_cli.partition.codes import check_class_indices
    from mbp_cli.partition.cuts import find_cuts, split, trace
    from mbp_cli.recipe.spec import partition_spec

    spec = partition_spec(recipe)
    if spec is None:
        return ""
    graph = trace(model)
    cuts = find_cuts(graph, spec[0].at)
    check_class_indices(step.on(torch.device("cpu")).on_device(batch)[2])  # values, not meta
    if next(model.parameters()).device.type != "meta":  # values, not only shapes
        with torch.no_grad():
            check_codes_fit(spec[1], cuts, run_parts(split(model, graph, cuts), batch, step))
    return f"; cut into {len(cuts) + 1} parts at {', '.join(c.name for c in cuts)}"


def check_strategies(recipe: Recipe, model: torch.nn.Module, device: torch.device) -> Blocks:
    """Refuse, as training would, memory strategies that cannot apply: offload on a device
    without a GPU (`device`, the run's), named block classes the model does not have. Returns
    the blocks they would wrap (none where no strategy is asked)."""
    memory = recipe.memory
    if memory.offload == "on":
        refuse_offload_here(device)
    if memory.checkpoint_modules or "on" in (memory.checkpointing, memory.offload):
        return check_blocks(model, memory.checkpoint_modules, "memory.checkpointing")
    return []
