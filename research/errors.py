"""The base class of expected failures: bad input, a busy workdir, a damaged checkpoint.

The command line reports an :class:`ExpectedError` as one line naming the file, line or key
(no traceback) and exits with its ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ExpectedError(Exception):
    """A failure the user can act on; the message alone says what and where."""

    exit_code = 2
