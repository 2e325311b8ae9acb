"""Bad input, told apart from bugs: the `simmim` command prints a `UsageError` as one line (exit status
2) and any other exception with its traceback, as a bug to report.

Each class also derives from the builtin a caller of the library would catch for it (ValueError,
KeyError, TypeError), so code written against those keeps working."""

from __future__ import annotations


class UsageError(ValueError):
    """A name, value, setting or file that cannot be used: the message names it and what was expected."""


class UnknownName(UsageError, KeyError):
    """A name a registry does not hold (a model, a preset, a key of a checkpoint)."""

    __str__ = UsageError.__str__  # the message as written, not KeyError's quoted repr


class BadArgument(UsageError, TypeError):
    """An argument of a kind a public function does not take (an unknown setting, an object it cannot use)."""
