"""Errors the user can act on, each carrying the exit code the CLI returns."""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from mbp_cli.units import format_bytes

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3
EXIT_NONFINITE = 4


class MbpError(Exception):
    """A known failure: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = EXIT_RUNTIME
    hints_traceback = True  # where the input was fine, the traceback may show a fault of ours
    label = "error"  # how the CLI introduces the message
    agreed = False  # several ranks: every rank raised it, having agreed (rank 0 reports it)

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        if message.startswith("Caught ") and "DataLoader worker" in message:
            # Raised in a DataLoader worker: torch re-raises it with the worker's traceback
            # in the message, whose last line is ours.
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(MbpError):
    """Bad input from the user: a missing file, a bad option, a run folder in the way."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """Every problem found in a recipe, reported together with the path of each key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{source} is not a valid recipe ({count} problem{'s' if count != 1 else ''})"
        super().__init__("\n".join([header, *(f"  • {p}" for p in self.problems)]))


class DoesNotFitError(MbpError):
    """Not even a micro-batch of one sample fits in memory."""

    exit_code = EXIT_DOES_NOT_FIT


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means the device ran out of memory (and a smaller step may fit)."""
    torch = sys.modules.get("torch")  # not imported for it: an error of torch's means it is
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):  # CUDA, the simulated
        return True
    # The CPU allocator has no exception type of its own: this is its message (c10 CPUAllocator).
    message = "DefaultCPUAllocator: can't allocate memory"
    return isinstance(exc, RuntimeError) and message in str(exc)


@contextlib.contextmanager
def fits_in_memory(what: str) -> Iterator[None]:
    """Make `what`; running out of memory there is a DoesNotFitError naming it (exit 3)."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        asked = re.search(r"you tried to allocate (\d+) bytes", str(exc))  # the CPU's words
        said = (f"it asked for {format_bytes(int(asked[1]))} at once, more than the machine "
                "can give" if asked else " ".join(str(exc).split()))
        raise DoesNotFitError(f"{what} does not fit in memory: {said}") from exc


def does_not_fit(micro_batch: int, needed_bytes: int | None, budget_bytes: int,
                 margin: float) -> DoesNotFitError:
    """The probe's error when a step at the smallest micro-batch is over the budget."""
    usable = budget_bytes * (1 - margin)
    needed = ("ran out of memory" if needed_bytes is None
              else f"needs {format_bytes(needed_bytes)}")
    return DoesNotFitError(
        f"the recipe does not fit: a step at micro-batch {micro_batch} {needed}, but the budget "
        f"is {format_bytes(budget_bytes)} ({format_bytes(usable)} after the {margin:.0%} "
        "margin). Use a larger budget, a smaller model, or a device with more memory")


class NonFiniteLossError(MbpError):
    """The loss became NaN or infinite (train.on_nonfinite: stop)."""

    exit_code = EXIT_NONFINITE
    agreed = True  # the global mean's: the same on every rank


class StoppedError(MbpError):
    """Stopped by SIGINT or SIGTERM after a checkpoint; exit 130 or 143."""

    label = "stopped"
    agreed = True  # the ranks stop after the same target batch


class UserCodeError(UsageError):
    """Your own code (a model or dataset constructor, a dataset, a collate) raised: the CLI
    shows its traceback, since the fix is in that code, then this message."""

    def __init__(self, message: str, details: str = "") -> None:
        # Re-raised from a DataLoader worker, the message holds the worker's traceback.
        self.details = details or (message if "DataLoader worker" in message else "")
        super().__init__(message)


@contextlib.contextmanager
def users_code(what: str) -> Iterator[None]:
    """Run the user's code; an exception it raises becomes a UserCodeError naming `what`."""
    try:
        yield
    except MbpError:
        raise
    except Exception as exc:
        raise UserCodeError(f"{what} raised {type(exc).__name__}: {exc}",
                            traceback.format_exc()) from exc


# What a built-in builder (mbp's, torch's, torchvision's) raises for arguments it cannot take
REFUSALS = (TypeError, ValueError, RuntimeError, AssertionError, IndexError, KeyError,
            OverflowError, ZeroDivisionError)


@contextlib.contextmanager
def refused_arguments(path: str, args: dict[str, Any], label: str,
                      build_without: Callable[[str], object] | None = None) -> Iterator[None]:
    """Run a built-in builder on the recipe's arguments at `path`: what it raises is its
    refusal of them, one line naming them and what it said (exit 2). Where `build_without(key)`
    builds again without one of them, the one whose absence alone lets it build is named."""
    try:
        yield
    except MbpError:
        raise
    except REFUSALS as exc:
        said = " ".join(str(exc).split()) or type(exc).__name__
        culprits = [key for key in args if build_without and _builds(build_without, key)]
        if len(culprits) == 1:  # more: the arguments refused together, all named
            key = culprits[0]
            raise UsageError(f"{path}.{key}={args[key]!r}: {label} refuses it ({said})") \
                from exc
        raise UsageError(f"{path} {args}: {label} refused them: {said}") from exc


def _builds(build_without: Callable[[str], object], key: str) -> bool:
    try:
        build_without(key)
    except REFUSALS:
        return False
    return True


def suggest(word: str, options: Iterable[str], prefix: str = "") -> str:
    """'; did you mean X?' for the option nearest to `word` (case aside), or nothing."""
    by_lower = {option.lower(): option for option in options}
    if word.lower() in by_lower:
        return f"; did you mean {prefix}{by_lower[word.lower()]}?"
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{by_lower[match[0]]}?" if match else ""


def describe(value: Any) -> str:
    """A short, readable account of a value's type and shape, for messages."""
    torch = sys.modules.get("torch")  # not imported for it: a tensor means torch is loaded
    if torch is not None and isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, list | tuple):
        inner = ", ".join(describe(v) for v in value[:3]) + (", …" if len(value) > 3 else "")
        return f"a {type(value).__name__} of ({inner})"
    return f"a {type(value).__name__}"
