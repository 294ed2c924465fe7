"""User-facing errors.

Anything raised as a :class:`UserError` is a problem with the user's input (a config value, a
path, a name) rather than a bug: the CLI prints its one-line message and exits with status 2,
without a traceback. Messages name what is wrong and how to fix it.
"""

from collections.abc import Iterable


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the problem and the fix."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value, model shape or teacher choice."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """``"did you mean model.mask_ratio?"`` for the closest of ``choices``, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=n)
    return f"did you mean {', '.join(close)}?" if close else ""
