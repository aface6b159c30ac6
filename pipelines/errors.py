"""The project's own exceptions: what a user can cause, and a stop they asked for.

Raised where an input is checked (a setting, a file, a request); the entry points turn exactly these into one line
(`pipelines.config.clean_errors`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the job; the entry point exits 128 + `signum` with `message`."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        super().__init__(message)
        self.signum, self.message = signum, message
