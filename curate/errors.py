"""Errors a user can act on: each says what is wrong, where, and (when we know) how to fix it."""

from __future__ import annotations

from dataclasses import dataclass


class CurateError(Exception):
    """An error meant for the user, printed without a traceback by the CLI."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


@dataclass(frozen=True)
class Issue:
    """One problem in a recipe: the key it is at (`stages[2].dedup.minhash.threshold`), what is
    wrong, and a hint."""

    where: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class RecipeError(CurateError):
    """The recipe is invalid. It carries every issue found, not only the first."""

    def __init__(self, message: str | list[Issue], hint: str = "") -> None:
        self.issues = list(message) if isinstance(message, list) else [Issue("", message, hint)]
        first = self.issues[0]
        if len(self.issues) == 1:
            super().__init__(str(first), first.hint)
        else:
            lines = [f"{len(self.issues)} problems in the recipe:"]
            lines += [
                f"  {issue}" + (f"  (hint: {issue.hint})" if issue.hint else "") for issue in self.issues
            ]
            super().__init__("\n".join(lines), "")


class FormatError(CurateError):
    """An input file has a shape no converter knows, or a field mapping does not fit it."""
