"""The one base class of the errors a user can cause (a bad option, row, file, folder, reward ...).

The ``vlalign`` command prints such an error as one line naming what is wrong and exits with
status 2, without a traceback; ``--debug`` (or ``VLALIGN_DEBUG=1``) shows the traceback too. An
exception that is not a :class:`UserError` is a bug of vlalign and keeps its traceback.

Each layer keeps its own error class (``DataError`` in data, ``ConfigError`` in config, ...),
derived from :class:`UserError` and from the built-in class it always was (``ValueError``,
``RuntimeError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix: its message names the file, row or option and what to do."""
