"""Hydra at the edge: the config folder, an OmegaConf resolver for repo paths, and a clean-error wrapper."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO_ROOT / "conf")

# `${repo:data/sample}` -> an absolute path inside the project checkout, whatever the working directory.
if not OmegaConf.has_resolver("repo"):
    OmegaConf.register_new_resolver("repo", lambda rel="": str(REPO_ROOT / rel))


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


def clean_errors(*expected: type[BaseException]) -> Callable:
    """Turn `expected` exceptions (and UserError) raised by an entry point into 'error: ...' and exit 2."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except MissingMandatoryValue as exc:
                print(f"error: {exc.full_key} is required: give it on the command line ({exc.full_key}=...)",
                      file=sys.stderr)
                sys.exit(2)
            except (UserError, *expected) as exc:
                logging.getLogger(fn.__module__).debug("details", exc_info=True)
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)

        return inner

    return wrap
