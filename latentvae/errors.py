"""The one exception family for a user's mistake, as opposed to a bug.

A `UserError` says which path, key or flag was wrong and what was expected. The command line
prints its message as one line (`latentvae COMMAND: error: ...`), exits with status 2 and shows
no traceback; any other exception is a bug and keeps its traceback. Library callers can catch
`UserError`; the concrete classes also derive from the built-in type they replace
(`ValueError`, `FileNotFoundError`, ...), so older `except ValueError` code keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Input that cannot be used: the message names the file, key or flag and what was expected."""


class BadInputError(UserError, ValueError):
    """A value, file or folder given by the user that cannot be used."""


class MissingInputError(UserError, FileNotFoundError):
    """A path the user named that does not exist or holds nothing usable."""
