"""The recipe as frozen dataclasses, one per section, and the values read out of them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from mbp_cli.errors import UsageError
from mbp_cli.recipe.fields import build_section, spec


@dataclass(frozen=True)
class ModelSpec:
    name: str = spec()
    args: dict[str, Any] = spec({})
    output: str | int | None = spec(None)  # the output's key, attribute or tuple index
    head: str | None = spec(None)  # the classifier replaced for num_classes with weights


@dataclass(frozen=True)
class DataSpec:
    name: str = spec()
    args: dict[str, Any] = spec({})
    resize: int | None = spec(None, minimum=1)  # square side for image datasets
    eval_fraction: float = spec(0.1, minimum=0.0, maximum=0.9)  # held out if no test split
    target: str | None = spec(None)  # dict samples: the target's key (labels, label, target)
    collate: str | None = spec(None)  # package.module:callable making a batch of samples
    transforms: list[Any] | None = spec(None)  # torchvision transforms.v2, training split
    eval_transforms: list[Any] | None = spec(None)  # held-out split (default: resize, normalize)
    normalize: str | None = spec(None, choices=("imagenet",))
    input_shape: list[int] | None = spec(None)  # one sample's, for --estimate without the data
    # the held-out split's own dataset: {name, args} (data's args too where it is data's own)
    eval: dict[str, Any] | None = spec(None)


@dataclass(frozen=True)
class BatchSpec:
    target: int = spec(minimum=1)
    micro: int | str | list = spec(minimum=1)  # or "auto": the probe picks it; or one per rank
    drop_last: bool = spec(False)  # drop an epoch's smaller last target batch
    memory_budget: int | str | None = spec(None)  # "20GiB"; default: free memory × fraction
    memory_fraction: float = spec(0.9, minimum=0.01, maximum=1.0)
    memory_margin: float = spec(0.05, minimum=0.0, maximum=0.5)  # kept free below the budget
    batchnorm: str = spec("micro", choices=("micro", "frozen"))  # frozen: BatchNorm in eval mode
    shares: list | None = spec(None)  # several ranks: each one's weight (default: even)
    balance: str = spec("even", choices=("even", "dynamic"))  # dynamic: shares follow speed
    rebalance_every: int = spec(0, minimum=0)  # steps between rebalances; 0: each epoch

    def micro_for(self, rank: int, world_size: int) -> int | str:
        """This rank's micro-batch: batch.micro, or its own entry of a list of one per rank;
        'auto' where the probe picks it."""
        if not isinstance(self.micro, list):
            return self.micro
        if len(self.micro) != world_size:
            raise UsageError(f"batch.micro gives {len(self.micro)} micro-batches for "
                             f"{world_size} rank{'s' if world_size > 1 else ''}; give one per "
                             "rank (or one for all)")
        return self.micro[rank]

    @property
    def fixed_micro(self) -> int | None:
        """The micro-batch the recipe fixes for every rank (None: auto, or one per rank)."""
        return self.micro if isinstance(self.micro, int) else None


@dataclass(frozen=True)
class OptimSpec:
    name: str = spec()
    args: dict[str, Any] = spec({})
    # of the whole target batch's gradient; 0 would zero every gradient
    clip_grad_norm: float | None = spec(None, above=0.0)
    clip_grad_value: float | None = spec(None, above=0.0)


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = spec("none", choices=("none", "constant", "cosine", "linear"))
    warmup_steps: int = spec(0, minimum=0)
    final_lr_fraction: float = spec(0.0, minimum=0.0)  # where cosine and linear decay end


@dataclass(frozen=True)
class LossSpec:
    # auto: the model's own where its forward takes labels and no args are given (Hugging
    # Face's way), else cross_entropy
    name: str = spec("auto")
    args: dict[str, Any] = spec({})


@dataclass(frozen=True)
class LabelSpec:
    """train.partition.labels: the synthetic intermediate labels, one random code per class."""

    kind: str = spec("gaussian", choices=("gaussian", "uniform"))  # uniform: [0, 1), after ReLU
    dim: int | str = spec("auto", minimum=1)  # the code's size: the cut's width ('auto')
    noise: float = spec(0.1, minimum=0.0)  # std of the noise on the code a later part reads
    seed: int | None = spec(None, minimum=0)  # default: the recipe's seed


@dataclass(frozen=True)
class PartitionSpec:
    """train.partition (experimental): the model cut into parts that train apart."""

    at: list = spec()  # where a new part begins: module names (or Sequential indices)
    labels: dict[str, Any] = spec({})  # a LabelSpec
    intermediate_loss: str = spec("mse", choices=("mse", "cosine"))


@dataclass(frozen=True)
class TrainSpec:
    steps: int | None = spec(None, minimum=1)
    epochs: int | None = spec(None, minimum=1)
    eval_every: int = spec(50, minimum=0)
    log_every: int = spec(10, minimum=1)
    log: list | None = spec(None)  # loggers besides metrics.jsonl: tensorboard, mlflow, wandb
    experiment: str | None = spec(None)  # mlflow's experiment, wandb's project (default: name)
    log_artifacts: bool = spec(True)  # mlflow: model.pt and summary.json as the run's artifacts
    device: str = spec("auto")
    dtype: str = spec("float32", choices=("float32", "float64"))
    num_workers: int = spec(0, minimum=0)
    checkpoint_every: int = spec(50, minimum=0)  # steps; 0: only at the end
    keep_checkpoints: int = spec(2, minimum=1)
    on_nonfinite: str = spec("stop", choices=("stop", "skip"))  # a NaN or infinite loss
    precision: str = spec("fp32", choices=("fp32", "bf16", "fp16", "auto"))  # autocast
    compile: bool = spec(False)  # torch.compile the model
    collective_timeout: float = spec(1800.0, minimum=1.0)  # seconds a rank waits for the others
    heartbeat_timeout: float = spec(60.0, minimum=1.0)  # seconds a silent rank counts as stopped
    partition: dict[str, Any] | None = spec(None)  # a PartitionSpec: experimental


@dataclass(frozen=True)
class MemorySpec:
    checkpointing: str = spec("off", choices=("off", "on", "auto"))  # recompute activations
    checkpoint_modules: list[str] | None = spec(None)  # block classes (default: found)
    offload: str = spec("off", choices=("off", "on", "auto"))  # activations to host memory
    offload_blocks: int | None = spec(None, minimum=1)  # the first k blocks (on: all)


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int
    model: ModelSpec
    data: DataSpec
    batch: BatchSpec
    optim: OptimSpec
    schedule: ScheduleSpec
    loss: LossSpec
    train: TrainSpec
    memory: MemorySpec
    folder: str | None = field(default=None, compare=False)  # where it was read: imports look here

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data, loadable again by load_recipe."""
        data = dataclasses.asdict(self)
        del data["folder"]
        return data


READ_FROM = "# mbp: read from "  # a saved recipe's first line: where its import paths resolve
SECTIONS: dict[str, type] = {
    "model": ModelSpec, "data": DataSpec, "batch": BatchSpec, "optim": OptimSpec,
    "schedule": ScheduleSpec, "loss": LossSpec, "train": TrainSpec, "memory": MemorySpec,
}
REQUIRED_SECTIONS = ("model", "data", "batch", "optim")
TOP_LEVEL_KEYS = ("name", "seed", *SECTIONS)


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of a resolved recipe, in section order."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)


def eval_data(recipe: Recipe) -> tuple[str, dict[str, Any]] | None:
    """data.eval as (dataset name, arguments): data's own name where it names none, and then
    data's args under its own."""
    held_out = recipe.data.eval
    if held_out is None:
        return None
    name = held_out.get("name", recipe.data.name)
    inherited = recipe.data.args if name == recipe.data.name else {}  # data's own: its args
    return name, {**inherited, **held_out.get("args", {})}


def partition_spec(recipe: Recipe) -> tuple[PartitionSpec, LabelSpec] | None:
    """train.partition and its labels as dataclasses (None: normal training)."""
    if recipe.train.partition is None:
        return None
    problems: list[str] = []
    partition = build_section(PartitionSpec, recipe.train.partition, "train.partition", problems)
    labels = build_section(LabelSpec, partition.labels, "train.partition.labels", problems)
    return partition, labels


def recipe_folders(recipe: Recipe) -> tuple[str, ...]:
    """Where the recipe's import paths are looked up before the current folder."""
    return (recipe.folder,) if recipe.folder else ()
