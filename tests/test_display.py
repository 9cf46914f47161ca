"""The live display in a real pseudo-terminal: at 80 columns the bar and the times stay, the
figures that do not fit are dropped whole (peak memory first, then samples/s)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest
from conftest import REPO, small_recipe

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_in_terminal(args: list[str], columns: int, cwd) -> list[str]:
    """Run `python -m mbp_cli ARGS` on a pseudo-terminal `columns` wide; the lines it drew."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env.update(TERM="xterm-256color", PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "mbp_cli", *args], stdin=follower,
                               stdout=follower, stderr=follower, env=env, cwd=cwd)
    os.close(follower)
    output = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")[-2000:]
    os.close(leader)
    return [line for line in re.split(r"[\r\n]+", ANSI.sub("", output.decode()))]


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 160])
def test_the_bar_and_times_stay_and_figures_drop_in_order(tmp_path, write_recipe, columns):
    recipe = write_recipe(small_recipe(train={"steps": 30, "eval_every": 0, "device": "cpu"}))
    lines = run_in_terminal(["train", str(recipe), "--out", str(tmp_path / "run")], columns,
                            tmp_path)
    frames = [line for line in lines if line.startswith("step ") and "left" in line]
    assert frames, lines
    assert all(len(line) <= columns for line in frames), max(frames, key=len)
    last = frames[-1]
    assert "━" in last and "elapsed " in last and "left 0:00:00" in last
    assert "loss " in last and "lr 0.1" in last
    if columns == 80:
        assert "peak" not in last and "samples/s" not in last
    else:
        assert "peak " in last and "samples/s" in last and "micro 7×8" in last


def test_train_help_reads_whole_in_80_columns(monkeypatch):
    """`mbp train --help` at 80 columns: every line fits, and no help text is cut short."""
    from typer.testing import CliRunner

    from mbp_cli.cli import app

    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    assert "…" not in result.output
    text = " ".join(line.strip("│ ") for line in lines)
    for phrase in ("Default: runs/<name>-<timestamp>.", "batch.memory_budget, else free memory",
                   "--resume continues it."):
        assert phrase in " ".join(text.split()), phrase
