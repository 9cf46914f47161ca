"""Data parallel: mbp against the loop a user writes with DistributedDataParallel (no_sync on
all but the last micro-batch); same model, same micro-batches, data in memory, real gloo
processes on the CPU, in two ways:

- the step: target_batch_step over the ranks against the DDP loop, in the same rank processes,
  taking turns round by round (who goes first alternates); a ratio is the median of the
  per-round ratios;
- the command: `mbp train --nproc 2 --json` against bench/ddp_hand.py under torchrun, runs
  alternating; a step's time is the gap between two step lines on stdout (everything a step
  costs, the loop's own work included), the median after warm-up; a ratio is the median of
  the per-round ratios of medians.

    python bench/distributed.py [--rounds 40] [--runs 3] [--nproc 2]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from common import markdown_table, paired_ratio, write_result
from torch.nn.parallel import DistributedDataParallel

from mbp_cli.catalog.classification import cross_entropy
from mbp_cli.catalog.models import mlp
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.distributed.world import World
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.run.target_batch import target_batch_step

FEATURES, HIDDEN, CLASSES = 512, 2048, 10  # 6.3M parameters
CASES = [(256, 128), (256, 64), (256, 32)]  # target batch, micro-batch: 1, 2, 4 per rank


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = mlp(in_features=FEATURES, hidden=HIDDEN, out_features=CLASSES, depth=2)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def shares(rank: int, nproc: int, target: int, micro: int, seed: int):
    """This rank's micro-batches of each target batch: (inputs, targets), in memory."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4 * target, FEATURES, generator=generator)
    targets = torch.randint(0, CLASSES, (4 * target,), generator=generator)
    share = target // nproc
    for step in itertools.count():
        start = (step % 4) * target + rank * share
        yield [(inputs[i:i + micro], targets[i:i + micro])
               for i in range(start, start + share, micro)]


def ddp_loop(rank: int, nproc: int, target: int, micro: int) -> Callable[[], None]:
    """DDP's documented accumulation: no_sync() but on the last micro-batch; each rank's loss
    a sum over the whole target batch's count (DDP averages over the ranks)."""
    model, optimizer = build()
    ddp, batches = DistributedDataParallel(model), shares(rank, nproc, target, micro, 1)

    def step() -> None:
        pieces = next(batches)
        for index, (x, y) in enumerate(pieces):
            last = index == len(pieces) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                (F.cross_entropy(ddp(x), y, reduction="sum") * nproc / target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def mbp_loop(rank: int, nproc: int, target: int, micro: int) -> Callable[[], None]:
    """mbp's path: target_batch_step over the ranks, then the optimizer's step."""
    model, optimizer = build()
    ranks = Ranks(World(rank=rank, size=nproc, is_launched=True), torch.device("cpu"))
    micro_step = MicroStep(model, cross_entropy(), torch.device("cpu"), torch.float32)
    batches = shares(rank, nproc, target, micro, 1)

    def step() -> None:
        target_batch_step(micro_step, next(batches), ranks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rank_main(rank: int, nproc: int, port: int, rounds: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=nproc)
    results = []
    for target, micro in CASES:
        steps = {"mbp": mbp_loop(rank, nproc, target, micro),
                 "ddp": ddp_loop(rank, nproc, target, micro)}
        times: dict[str, list[float]] = {label: [] for label in steps}
        for step in steps.values():  # warm-up
            step()
            step()
        for round_index in range(rounds):
            order = list(steps.items())
            for label, step in order if round_index % 2 == 0 else order[::-1]:
                dist.barrier()
                started = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - started)
        results.append({"target": target, "micro_batch": micro,
                        "micro_batches_per_rank": target // nproc // micro,
                        "ddp_ms": 1000 * statistics.median(times["ddp"]),
                        "mbp_ms": 1000 * statistics.median(times["mbp"]),
                        "mbp_over_ddp": paired_ratio(times, "mbp", "ddp")})
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


HERE = Path(__file__).parent
CLI_STEPS, WARM_UP = 40, 5


def step_gaps(command: list[str], cwd: Path) -> list[float]:
    """Seconds between consecutive step lines of a command's stdout, read as they come, after
    the warm-up."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    marks = [time.perf_counter() for line in process.stdout
             if line.startswith(("step ", '{"event": "step"'))]
    if process.wait() or len(marks) != CLI_STEPS:
        raise SystemExit(f"{' '.join(command)} failed ({len(marks)} steps)")
    return [b - a for a, b in itertools.pairwise(marks)][WARM_UP:]


def command_ratios(nproc: int, runs: int) -> list[dict]:
    """`mbp train --nproc` against the hand DDP script, per case."""
    results = []
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        for target, micro in CASES[:2]:
            recipe = {"name": "ddp-bench", "seed": 0,
                      "model": {"name": "mlp", "args": {"in_features": FEATURES,
                                                        "hidden": HIDDEN}},
                      "data": {"name": "synthetic", "args": {"num_samples": 4096,
                                                             "shape": [FEATURES]}},
                      "batch": {"target": target, "micro": micro},
                      "optim": {"name": "SGD", "args": {"lr": 0.01, "momentum": 0.9}},
                      "train": {"steps": CLI_STEPS, "eval_every": 0, "checkpoint_every": 0,
                                "device": "cpu"}}
            (cwd / "recipe.yaml").write_text(yaml.safe_dump(recipe))
            contenders = {
                "mbp": [sys.executable, "-m", "mbp_cli", "train", "recipe.yaml", "--nproc",
                        str(nproc), "--json", "--out", "run", "--overwrite"],
                "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                        str(nproc), str(HERE / "ddp_hand.py"), "--target", str(target),
                        "--micro", str(micro), "--steps", str(CLI_STEPS), "--features",
                        str(FEATURES), "--hidden", str(HIDDEN)]}
            medians: dict[str, list[float]] = {label: [] for label in contenders}
            for run in range(runs):
                order = list(contenders.items())
                for label, command in order if run % 2 == 0 else order[::-1]:
                    medians[label].append(statistics.median(step_gaps(command, cwd)))
            results.append({"target": target, "micro_batch": micro,
                            "micro_batches_per_rank": target // nproc // micro,
                            "ddp_ms": 1000 * statistics.median(medians["ddp"]),
                            "mbp_ms": 1000 * statistics.median(medians["mbp"]),
                            "mbp_over_ddp": paired_ratio(medians, "mbp", "ddp")})
    return results


def table(results: list[dict], nproc: int, what: str) -> str:
    rows = [[f"{r['target']} / {r['micro_batch']} ({r['micro_batches_per_rank']} per rank)",
             f"{r['ddp_ms']:.1f}", f"{r['mbp_ms']:.1f}", f"{r['mbp_over_ddp']:.3f}"]
            for r in results]
    return markdown_table([f"{what}: target / micro, {nproc} ranks", "DDP ms", "mbp ms",
                           "mbp / DDP"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(rank_main, args=(args.nproc, port, args.rounds, queue), nprocs=args.nproc)
    steps = queue.get()
    print(table(steps, args.nproc, "step"))
    commands = command_ratios(args.nproc, args.runs)
    print(table(commands, args.nproc, "command"))
    write_result("distributed", {"nproc": args.nproc, "rounds": args.rounds, "runs": args.runs,
                                 "parameters": sum(p.numel() for p in build()[0].parameters()),
                                 "steps": steps, "commands": commands})


if __name__ == "__main__":
    main()
