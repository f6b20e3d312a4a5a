"""Errors a user can act on: each says what is wrong, where, and (when we know) how to fix it."""

from __future__ import annotations


class CurateError(Exception):
    """An error meant for the user, printed without a traceback by the CLI."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class RecipeError(CurateError):
    """The recipe is invalid; the message names the recipe key."""


class FormatError(CurateError):
    """An input file has a shape no converter knows, or a field mapping does not fit it."""
