"""User-facing errors.

Anything raised as a :class:`UserError` is a problem with the user's input (a config value, a
path, a name) rather than a bug: the CLI prints its one-line message and exits with status 2,
without a traceback. Messages name what is wrong and how to fix it.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the problem and the fix."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value, model shape or teacher choice."""
