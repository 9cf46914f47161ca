"""What a README transcript is: its marker and options, the lines it keeps, and the lines as
they are compared, the machine's figures aside (tools/readme.py runs them; see its docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ELISION = "…"
MARKER = re.compile(r"^(\s*)<!-- transcript(?::\s*(?P<flags>[^\n]*?))?\s*(?P<end>-->)?\s*$")
LABEL = re.compile(r"^\s*_Times, speeds and process memory above: .*_$")
RULE = re.compile(r"\s*(first \d+|last \d+|none|(?:from )?/(?:[^/\\]|\\.)*/)\s*(?:,|$)")

# Figures that depend on the machine, its load or the clock: the test ignores them (and a block
# that shows any gets the machine's line). Memory of tensors, batch sizes, losses and
# accuracies are not among them: those are what a transcript promises.
HOST_FIGURES = [
    re.compile(r"[\d,]+(?:\.\d+)? samples/s"),
    re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|µs|s)\b"),  # 4.1 ms, 12.9 s, 1037.34s
    re.compile(r"\b\d+:\d\d(?::\d\d)?\b"),  # 0:17:17
    re.compile(r"\b\d{8}-\d{6}\b"),  # a default run folder's timestamp
    re.compile(r"\b\d{4}-\d\d-\d\d\b"),
    re.compile(r"process [\d.]+ [KMGT]?i?B"),  # the process's peak RSS, torch's libraries in it
]
# Table columns (and a summary's rows) whose every figure is the machine's.
HOST_COLUMNS = {"step time", "samples/s", "wall time", "s / target batch", "compile time"}
BOX = "│┃║"


@dataclass
class Transcript:
    """One marked console block: where it is in the README, its options and its commands."""

    marker: int  # line index of `<!-- transcript`
    opening: int  # line index of the opening fence
    closing: int  # line index of the closing fence
    indent: str
    lines: list[str]  # the block's lines as they are, indent removed
    is_slow: bool = False
    exit_code: int = 0
    before: list[str] = field(default_factory=list)
    keep: dict[int, str] = field(default_factory=dict)  # 0: every command
    wrap: int | None = None
    columns: int = 80
    interrupt: re.Pattern | None = None
    masks: list[re.Pattern] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def commands(self) -> list[str]:
        return [line[2:] for line in self.lines if line.startswith("$ ")]

    @property
    def name(self) -> str:
        return self.commands[0].split("#")[0].strip() if self.commands else f"line {self.marker}"


def slashed(text: str) -> re.Pattern:
    """`/regex/` → the pattern."""
    if not (len(text) >= 2 and text[0] == text[-1] == "/"):
        raise ValueError(f"expected /regex/, got {text!r}")
    return re.compile(text[1:-1])


def transcripts(text: str) -> list[Transcript]:
    """Every marked console block of a README, in order."""
    lines, found, i = text.split("\n"), [], 0
    while i < len(lines):
        match = MARKER.match(lines[i])
        if not match:
            i += 1
            continue
        marker, indent, options = i, match.group(1), []
        while not lines[i].rstrip().endswith("-->"):
            i += 1
            options.append(lines[i].strip().removesuffix("-->").strip())
        opening = i + 1
        if lines[opening].strip() != "```console":
            raise ValueError(f"README line {opening + 1}: a transcript marker not before a "
                             "```console block")
        closing = next(j for j in range(opening + 1, len(lines)) if lines[j].strip() == "```")
        block = Transcript(marker, opening, closing, indent,
                           [line.removeprefix(indent) for line in lines[opening + 1:closing]],
                           is_slow="slow" in (match.group("flags") or "").split())
        for option in filter(None, options):
            key, _, value = option.partition(":")
            key, value = key.strip(), value.strip()
            if key == "before":
                block.before.append(value)
            elif key == "keep" or key.startswith("keep "):
                block.keep[int(key[5:] or 0)] = value
            elif key in ("wrap", "columns"):
                setattr(block, key, int(value))
            elif key == "exit":
                block.exit_code = int(value)
            elif key == "interrupt":
                block.interrupt = slashed(value)
            elif key == "mask":
                block.masks.append(slashed(value))
            elif key == "files":
                block.files.extend(value.split())
            else:
                raise ValueError(f"README line {marker + 1}: unknown transcript option {key!r}")
        found.append(block)
        i = closing + 1
    return found


def kept(lines: list[str], rules: str | None) -> list[str]:
    """The lines the rules keep, with a `…` for each run of lines left out."""
    if not rules:
        return lines
    keep = [line == "^C" for line in lines]
    for rule in RULE.findall(rules):
        if rule.startswith(("first ", "last ")):
            count = int(rule.split()[1])
            span = range(min(count, len(lines))) if rule.startswith("first") else \
                range(max(len(lines) - count, 0), len(lines))
        elif rule.startswith("from "):
            pattern = slashed(rule[5:])
            start = next((j for j, line in enumerate(lines) if pattern.search(line)), len(lines))
            span = range(start, len(lines))
        elif rule == "none":
            span = range(0)
        else:
            span = [j for j, line in enumerate(lines) if slashed(rule).search(line)]
        for j in span:
            keep[j] = True
    shown: list[str] = []
    for j, line in enumerate(lines):
        if keep[j]:
            shown.append(line)
        elif not shown or shown[-1] != ELISION:
            shown.append(ELISION)
    return shown


def wrapped(line: str, width: int | None) -> list[str]:
    """A line longer than `width` as lines, each broken after its last `, ` that fits."""
    if width is None or line[:1] in BOX:
        return [line]
    lines = []
    while len(line) > width and (end := line.rfind(", ", 0, width - 1)) > 0:
        lines.append(line[:end + 1])
        line = line[end + 2:]
    return [*lines, line]


def masked(lines: list[str], masks: list[re.Pattern] = (), host: bool = True) -> list[str]:
    """The lines as the test compares them: host-dependent figures replaced by `#` (none with
    `host=False`), tables cell by cell (rich fits a table's borders to its widest cell, so the
    borders are not compared)."""
    out, headers, host_columns = [], [], set()
    for line in lines:
        stripped = line.strip()
        if stripped and all(c in "─━═┌┐└┘├┤┬┴┼┏┓┗┛┡┩╇┳┻╋╭╮╰╯ " for c in stripped):
            headers = headers if stripped[0] == "┡" else []  # ┡ closes a header of two rows
            continue
        cells = [c.strip() for c in re.split(f"[{BOX}]", stripped)]
        if len(cells) > 2:
            if "┃" in stripped:  # a header row, or the next line of a header's words
                headers = [f"{h} {c}".strip() for h, c in zip(headers or [""] * len(cells),
                                                             cells, strict=False)]
                host_columns = {j for j, c in enumerate(headers) if c in HOST_COLUMNS}
            is_host_row = cells[1] in HOST_COLUMNS  # a summary's `wall time │ 12.9 s`
            if host and "┃" not in stripped:
                cells = ["#" if c and (j in host_columns or (is_host_row and j > 1)) else c
                         for j, c in enumerate(cells)]
            stripped = " | ".join(cells)
        for pattern in (*HOST_FIGURES, *masks) if host else ():
            stripped = pattern.sub("#", stripped)
        out.append(stripped)
    return out


def has_host_figures(lines: list[str]) -> bool:
    """Whether anything in the lines depends on the machine."""
    return masked(lines) != masked(lines, host=False)
