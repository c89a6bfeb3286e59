"""Errors vitlab raises on bad input.

Every error a user can cause is one of these: the CLI prints its message on one line
(no traceback) and exits with status 2. Messages name the problem *and* the fix.
"""
from __future__ import annotations

import difflib


class VitlabError(Exception):
    """Base class of every user-facing vitlab error."""


class ConfigError(VitlabError, ValueError):
    """An impossible or unknown configuration (model, training, data options)."""


class DataError(VitlabError, ValueError):
    """Missing, corrupt or unreadable data."""


class CheckpointError(VitlabError, ValueError):
    """A corrupt checkpoint, or one that does not match the model it is loaded into."""


class TrainingDiverged(VitlabError, ArithmeticError):
    """Training stopped because the loss (or its gradient) stopped being a finite number."""


def did_you_mean(word: str, choices, n: int = 3) -> str:
    """' Did you mean: a, b?' for the closest choices, or '' when nothing is close."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not close:
        close = [c for c in choices if word.lower() in c.lower()][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""


def check_choice(field: str, value, choices) -> None:
    """ConfigError naming the field, the closest valid values and all of them, unless `value` is one."""
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not valid.{did_you_mean(str(value), [str(c) for c in choices])} "
                          f"Choose one of: {', '.join(map(str, choices))}.")
