"""Errors the user can act on, each carrying the exit code the CLI returns."""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class MbpError(Exception):
    """A known failure: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, exit_code: int | None = None) -> None:
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
