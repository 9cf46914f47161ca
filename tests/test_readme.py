"""The README's transcripts are what the commands print today. Each marked block (see
tools/readme.py; `make readme` rewrites them) is run again and compared line by line: the exit
codes and every figure but the machine's (times, speeds, the process's memory, dates), so a
tensor's memory, a probe's answer or a seeded run's accuracy that moves fails here."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import shlex

import pytest
from typer.testing import CliRunner

from mbp_cli.cli import app
from tests.conftest import REPO
from tools import readme
from tools.transcripts import Transcript, masked, transcripts

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = transcripts(README)


@pytest.fixture
def checkout(tmp_path):
    """A scratch copy of the checkout for one transcript (no block sees another's runs)."""
    return readme.scratch_folder(tmp_path)


def in_process(command: str, folder, block: Transcript) -> readme.Ran:
    """`mbp …` through Typer's runner in this process (torch imported once for all), stdout
    and stderr interleaved as a terminal shows them; anything else in a shell."""
    words = shlex.split(command, comments=True)
    if words[:1] != ["mbp"] or block.interrupt:
        return readme.in_shell(command, folder, block)
    with contextlib.chdir(folder):
        result = CliRunner().invoke(app, words[1:], env={"COLUMNS": str(block.columns)})
    return readme.Ran(result.exit_code, [line.rstrip() for line in result.output.splitlines()])


def assert_as_in_the_readme(block: Transcript, fresh: list[str]) -> None:
    want, got = masked(block.lines, block.masks), masked(fresh, block.masks)
    if want != got:
        diff = "\n".join(difflib.unified_diff(want, got, "README.md", "today", lineterm=""))
        pytest.fail(f"the README's transcript of `{block.name}` drifted from what it prints "
                    f"today (`make readme` rewrites it; `#` is a figure not compared):\n{diff}")


def ids(blocks: list[Transcript]) -> list[str]:
    return [re.sub(r"\W+", "-", b.name).strip("-") for b in blocks]


FAST = [b for b in BLOCKS if not b.is_slow]
SLOW = [b for b in BLOCKS if b.is_slow]


@pytest.mark.parametrize("block", FAST, ids=ids(FAST))
def test_a_transcript_is_what_its_commands_print(block, checkout):
    assert_as_in_the_readme(block, readme.rendered(block, checkout, in_process))


@pytest.mark.slow
@pytest.mark.transcript  # not in `make test`: a CPU that rounds float32 otherwise trains other
@pytest.mark.parametrize("block", SLOW, ids=ids(SLOW))  # figures (make readme-check)
def test_a_training_transcript_is_what_its_commands_print(block, checkout):
    assert_as_in_the_readme(block, readme.rendered(block, checkout))


def test_the_readme_marks_its_transcripts():
    names = [b.name for b in BLOCKS]
    for name in ("make train", "mbp probe recipes/digits.yaml --budget 16MiB",
                 "mbp validate bad.yaml", "mbp runs"):
        assert name in names
    assert readme.makefile_command("train") == "mbp train recipes/digits.yaml"


def test_a_drifted_figure_fails_and_a_machines_figure_does_not():
    probe = next(b for b in BLOCKS if b.name.startswith("mbp probe"))
    same = masked(probe.lines)

    def bumped(pattern: str) -> list[str]:
        """The probe's transcript with the first figure `pattern` finds one digit off."""
        def bump(match: re.Match) -> str:
            return re.sub(r"\d", lambda d: str((int(d.group()) + 1) % 10), match.group(),
                          count=1)
        lines = "\n".join(probe.lines)
        assert re.search(pattern, lines, flags=re.M), pattern
        return masked(re.sub(pattern, bump, lines, count=1).split("\n"))

    assert bumped(r"fits: \d+") != same  # the probe's answer
    assert bumped(r"\d+\.\d MiB │ +\d") != same  # a tensor's memory in the table
    assert bumped(r"\d+\.\d KiB per sample") != same
    assert bumped(r"\d+\.\d ms") == same  # a step's time
    assert bumped(r"[\d,]+ │\n") == same  # its samples/s
    assert bumped(r"batch: [\d.]+ s") == same
    line = "eval @ step 200: loss 0.5692  accuracy 99.16%"
    assert masked([line]) != masked([line.replace("99.16", "98.89")])
    line = "step 1/200  epoch 1  loss 2.3056  lr 0.0003  6,679 samples/s  peak 3.3 MiB"
    assert masked([line]) == masked([line.replace("6,679", "114")])
    assert masked([line]) != masked([line.replace("3.3 MiB", "701.6 MiB")])
    line = "│                  │ process 708.2 MiB (peak RSS, torch's libraries included)  │"
    assert masked([line]) == masked([line.replace("708.2", "761.4")])


def test_the_keys_a_resume_may_change_are_the_codes():
    from mbp_cli.run.resume import SAFE_TO_CHANGE_ON_RESUME

    sentence = re.split(r"may change\s+only", README)[1].split("Any other difference", 1)[0]
    listed = re.findall(r"`(\w+\.\w+)`", sentence)
    assert sorted(listed) == sorted(SAFE_TO_CHANGE_ON_RESUME)


def test_the_probes_json_keys_are_the_ones_the_readme_names():
    from mbp_cli.memory.fit import Fit, Measurement
    from mbp_cli.memory.search import ProbeResult

    fields = {f.name: 0 for f in dataclasses.fields(ProbeResult)}
    result = ProbeResult(**{**fields, "fit": Fit(0, 0, 0), "measurements": [Measurement(1, 0)]})
    data = result.to_dict()
    keys = {*data, *data["fit"], *data["measurements"][0]}
    bullet = README.split("- `--json` prints one object:", 1)[1].split("`--plot", 1)[0]
    named = set(re.findall(r"`(\w+)`", bullet))
    assert keys - named == set(), "keys of `mbp probe --json` the README does not name"
    values = {"cuda", "tracked", "simulated", "estimate", "max_memory_reserved"}
    assert named - keys - values == set(), "the README names keys `mbp probe --json` has not"
