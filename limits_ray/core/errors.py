"""The two errors a user can fix: a configuration value, and an input file or table.

Both carry a message that names the key or input and the fix; the CLI prints it as one ``error:``
line with exit code 2.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InputError"]


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


class InputError(ValueError):
    """Input that cannot be reduced; the message names the input and the fix."""
