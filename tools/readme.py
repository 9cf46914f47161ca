"""`make readme`: rerun the README's transcripts and write in what the commands print today.

A console block that shows real output has a marker, an HTML comment, on the line before it:

    <!-- transcript -->
    ```console
    $ mbp probe recipes/digits.yaml --budget 16MiB
    …what it printed…
    ```

The block's own `$ ` lines are the commands: each is run (by bash, `mbp` being this checkout's
`python -m mbp_cli`; `make TARGET` the Makefile target's mbp command; `echo $?` the last exit
code) in a scratch copy of the checkout's tracked files, and what it printed, stdout and stderr
as a terminal interleaves them, replaces the lines under it. Nothing of the user's is touched.
A fenced block after `<!-- NAME.ext -->` elsewhere in the README (a recipe, a module) is
written into the scratch folder as NAME.ext first, so a transcript can use it.

Options, one per line inside the marker (`<!-- transcript: slow` … `-->`):
    slow                  after `transcript:`: it trains; tests/test_readme.py runs it as `slow`
    before: COMMAND       run first, its output not shown (may repeat)
    exit: N               the exit code each command must give (default 0; `echo $?` shows it)
    keep: RULES           the lines shown, where the README shortens a long output:
                          `first N`, `last N`, `/regex/` (lines matching), `from /regex/` (that
                          line to the end), `none`; a `…` line stands for each run left out
    keep N: RULES         the same for the block's N-th command (1 = the first) alone
    wrap: N               a longer line goes on in the next, after its last `, ` that fits
                          (as a terminal of N columns would show it, near enough)
    columns: N            the terminal's width rich fits tables to (80, a pipe's default)
    interrupt: /regex/    Ctrl-C (SIGINT to the command's process group) after the first line
                          that matches; a `^C` line marks where
    mask: /regex/         more figures this block's test ignores (a stop step that depends on
                          timing), as HOST_FIGURES are ignored everywhere
    files: PATH...        copied back from the scratch folder into the checkout (a picture
                          the transcript's command drew)

Where a block shows host-dependent figures (HOST_FIGURES: times, speeds, the process's memory,
dates), a line under it names the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tools.transcripts import LABEL, Transcript, has_host_figures, kept, transcripts, wrapped

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FILE_MARKER = re.compile(r"^<!-- (?P<name>[\w.-]+\.\w+) -->$")


@dataclass
class Ran:
    """What one command did: its exit code and the lines it printed (`^C` where interrupted)."""

    exit_code: int
    lines: list[str]


Runner = Callable[[str, Path, "Transcript"], Ran]


def makefile_command(target: str) -> str:
    """`make train` → the mbp command the Makefile's target runs (`$(BIN)/` dropped)."""
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)",
                       (REPO / "Makefile").read_text(), re.M)
    commands = recipe.group(1).split("\n") if recipe else []
    mbp = [c.strip().removeprefix("$(BIN)/") for c in commands if "$(BIN)/mbp " in c]
    if len(mbp) != 1:
        raise ValueError(f"make {target}: the Makefile's target runs no single mbp command")
    return mbp[0]


def scratch_folder(parent: Path) -> Path:
    """A copy of the checkout's tracked files (as they are in the work tree), the README's
    named blocks written beside them, and `mbp` on PATH."""
    folder = parent / "checkout"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    for name, content in named_blocks(README.read_text(encoding="utf-8")).items():
        (folder / name).write_text(content, encoding="utf-8")
    shim = parent / "bin" / "mbp"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mbp_cli "$@"\n')
    shim.chmod(0o755)
    return folder


def named_blocks(text: str) -> dict[str, str]:
    """The fenced blocks after `<!-- NAME.ext -->` lines: file name → content."""
    lines, found = text.split("\n"), {}
    for i, line in enumerate(lines[:-1]):
        match = FILE_MARKER.match(line)
        if match and lines[i + 1].startswith("```"):
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            found[match.group("name")] = "\n".join(lines[i + 2:end]) + "\n"
    return found


def in_shell(command: str, folder: Path, block: Transcript) -> Ran:
    """Run one command as a user would in the checkout: bash, this checkout's mbp."""
    words = shlex.split(command, comments=True)
    if words[:1] == ["make"]:
        command = makefile_command(words[1])
    env = {**os.environ, "PATH": f"{folder.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(folder), "PYTHONUNBUFFERED": "1", "COLUMNS": str(block.columns),
           "LINES": "50", "TERM": "dumb"}
    for name in ("MBP_DEBUG", "NO_COLOR", "FORCE_COLOR", "MLFLOW_TRACKING_URI", "WANDB_MODE"):
        env.pop(name, None)
    process = subprocess.Popen(["bash", "-c", command], cwd=folder, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    lines, interrupted = [], False
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip("\n").rstrip())
        if block.interrupt and not interrupted and block.interrupt.search(line):
            os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C does: the foreground group
            lines.append("^C")
            interrupted = True
    return Ran(process.wait(), lines)


def rendered(block: Transcript, folder: Path, run: Runner = in_shell) -> list[str]:
    """The block's lines as its commands print them today."""
    for command in block.before:
        done = run(command, folder, block)
        if done.exit_code != 0:
            raise RuntimeError(f"{command}: exit {done.exit_code}\n" + "\n".join(done.lines))
    lines, last_exit = [], 0
    for number, command in enumerate(block.commands, 1):
        if command.split("#")[0].split() == ["echo", "$?"]:
            done = Ran(0, [str(last_exit)])
        else:
            done = run(command, folder, block)
            last_exit = done.exit_code
            if done.exit_code != block.exit_code:
                raise RuntimeError(f"{command}: exit {done.exit_code}, not {block.exit_code}\n"
                                   + "\n".join(done.lines))
        output = [line.replace(str(folder) + os.sep, "").replace(str(folder), ".")
                  for line in done.lines]
        lines.append("$ " + command)
        for line in kept(output, block.keep.get(number, block.keep.get(0))):
            lines += wrapped(line, block.wrap)
    return lines


def machine_line() -> str:
    """Where the host-dependent figures came from (bench/common.py's machine())."""
    sys.path.insert(0, str(REPO))
    from bench.common import machine

    info, load = machine(), os.getloadavg()[0]
    return (f"_Times, speeds and process memory above: {info['cpu']}, {info['cores']} cores "
            f"(load average {load:.1f}), torch {info['torch']}, Python {info['python']}, "
            f"{info['date'][:10]}; `make readme` wrote this block._")


def regenerate(only: str | None = None, fast_only: bool = False) -> list[str]:
    """Rewrite README.md's transcripts; the names of those rewritten."""
    text = README.read_text(encoding="utf-8")
    lines, label, done = text.split("\n"), None, []
    blocks = [b for b in transcripts(text) if (only is None or only in b.name)
              and not (fast_only and b.is_slow)]
    for block in reversed(blocks):  # from the end: earlier line numbers stay put
        print(f"make readme: {block.name}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="mbp-readme-") as parent:
            folder = scratch_folder(Path(parent))  # one each: no block sees another's runs
            fresh = rendered(block, folder)
            for name in block.files:
                shutil.copy2(folder / name, REPO / name)
        after = block.closing + 1
        has_label = after < len(lines) and LABEL.match(lines[after])
        new = [block.indent + line if line else line for line in fresh]
        tail = []
        if has_host_figures(fresh):
            label = label or machine_line()
            tail = [block.indent + label]
        lines[block.opening + 1:after + (1 if has_label else 0)] = \
            [*new, lines[block.closing], *tail]
        done.append(block.name)
    README.write_text("\n".join(lines), encoding="utf-8")
    return done[::-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", help="the transcripts whose first command contains this")
    parser.add_argument("--fast", action="store_true", help="leave the slow ones as they are")
    args = parser.parse_args()
    for name in regenerate(args.only, args.fast):
        print(f"rewrote: {name}")


if __name__ == "__main__":
    main()
