"""Dynamic Batch Size against even shares: two ranks (real processes, gloo) on the embedded
digits, one of them made 2× slower, time per target batch once the shares have moved.

Rank 1's slowness is a sleep per sample equal to the per-sample time the ranks measure without
it, so it takes twice as long as rank 0 for the same share. With even shares every target batch
waits for rank 1; `batch.balance: dynamic` moves samples to rank 0 in proportion to the speeds
(ideal ratio 2/3 for a 2× slower rank).

    python bench/balance.py [--steps 30] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import markdown_table, write_result

BENCH = Path(__file__).resolve().parent
TARGET, MICRO, EVERY = 256, 32, 5


def run(folder: Path, name: str, steps: int, nproc: int, balance: str, delay: float
        ) -> list[dict]:
    """One `mbp train --nproc` run; its step events."""
    recipe = {"name": name, "seed": 0,
              "model": {"name": "small_cnn", "args": {"num_classes": 10, "width": 64}},
              "data": {"name": "slow_rank:SlowDigits", "args": {"delay": delay}},
              "batch": {"target": TARGET, "micro": MICRO, "balance": balance,
                        "rebalance_every": EVERY},
              "optim": {"name": "SGD", "args": {"lr": 0.05}},
              "train": {"steps": steps, "eval_every": 0, "checkpoint_every": 0,
                        "device": "cpu"}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    subprocess.run([sys.executable, "-m", "mbp_cli", "train", f"{name}.yaml", "--out", name,
                    "--nproc", str(nproc), "-q"], cwd=folder, env=env, check=True)
    lines = (folder / name / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(BENCH / "slow_rank.py", folder / "slow_rank.py")
        # Rank 0's time per sample while rank 1 is slowed (it then has the cores to itself):
        # sleeping that long per sample on rank 1 makes it twice as slow.
        calibration = run(folder, "calibrate", 10, args.nproc, "even", 0.001)
        delay = statistics.median(1 / s["ranks"][0]["samples_per_second"]
                                  for s in calibration[2:])
        steps = {balance: run(folder, balance, args.steps, args.nproc, balance, delay)
                 for balance in ("even", "dynamic")}
    settled = EVERY * 2  # after the second rebalance
    seconds = {b: statistics.median(s["step_seconds"] for s in events[settled:])
               for b, events in steps.items()}
    ratio = seconds["dynamic"] / seconds["even"]
    shares = {b: [e for e in events if e["samples"] == TARGET][-1]["ranks"]
              for b, events in steps.items()}
    even = shares["even"]
    slowness = even[0]["samples_per_second"] / even[1]["samples_per_second"]
    rows = [[b, " + ".join(str(r["share"]) for r in shares[b]),
             " / ".join(f"{r['samples_per_second']:,.0f}" for r in shares[b]),
             f"{1000 * seconds[b]:.1f}", f"{seconds[b] / seconds['even']:.2f}"]
            for b in ("even", "dynamic")]
    table = markdown_table(["balance", "shares (rank 0 + 1)", "samples/s per rank",
                            "ms per target batch", "vs even"], rows)
    print(table)
    print(f"rank 1 is {slowness:.2f}× slower than rank 0 (measured, even shares)")
    write_result("balance-cpu", {
        "target_batch": TARGET, "micro_batch": MICRO, "rebalance_every": EVERY,
        "steps": args.steps, "nproc": args.nproc, "slow_rank_delay_seconds": delay,
        "rank_1_slower_by": slowness,
        "median_step_seconds": seconds, "dynamic_over_even": ratio, "final_ranks": shares,
        "table": table})


if __name__ == "__main__":
    main()
