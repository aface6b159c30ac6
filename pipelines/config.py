"""Hydra at the edge: the config folder, an OmegaConf resolver for repo paths, and a clean-error wrapper."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipelines.errors import Interrupted, UserError

PACKAGE_DIR = Path(__file__).resolve().parent
# The folders a wheel carries, kept at the top of the repository and copied to pipelines/_repo/ by the build
# (see [tool.setuptools] in pyproject.toml).
SHIPPED = ("conf", "serving", "data/sample", "data/siglip")
INSTALLED = (PACKAGE_DIR / "_repo" / "conf").is_dir()
# conf/, serving/ and data/ lie under REPO_ROOT both in a checkout (editable install or not) and in an installed
# wheel (there REPO_ROOT is pipelines/_repo); output paths never go there when installed (see `repo_path`).
REPO_ROOT = PACKAGE_DIR / "_repo" if INSTALLED else PACKAGE_DIR.parent
CONF_DIR = str(REPO_ROOT / "conf")


def repo_path(rel: str = "") -> str:
    """`${repo:REL}`: a shipped folder's absolute path (e.g. `data/sample`), whatever the working directory.

    In a checkout any REL lies in the checkout. In an installed wheel a REL outside the shipped folders (an
    output such as `outputs/serve_bench.md`) lies in the working directory instead: never in site-packages.
    """
    shipped = any(rel == top or rel.startswith(f"{top}/") for top in SHIPPED)
    root = REPO_ROOT if shipped or not INSTALLED else Path.cwd()
    return str(root / rel)


if not OmegaConf.has_resolver("repo"):
    OmegaConf.register_new_resolver("repo", repo_path)


def _print_resolved_config(argv: list[str]) -> None:
    # Hydra's `--cfg job` prints `${repo:...}` and `${dataset.name}` as written; `--resolve` prints the values the
    # job will use. Only for the project's own entry points (`python -m pipelines.X`), never for a host program.
    main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_module is None or not main_module.name.startswith("pipelines."):
        return
    shows_config = any(arg in ("--cfg", "-c") or arg.startswith("--cfg=") for arg in argv)
    if shows_config and "--resolve" not in argv:
        argv.append("--resolve")


def quote_brace_values(argv: list[str]) -> None:
    """Quote `key=value` overrides whose value holds a brace pattern (`/data/{00000..00127}.tar`, `{a,b}`): Hydra's
    override grammar reads a bare `{` as the start of a dict and refuses the line; quoted, it is the string."""
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if (eq and not arg.startswith("-") and "{" in value and value[:1] not in ("'", '"', "[", "{")
                and "${" not in value):
            argv[i] = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def given_keys(node: Any) -> list[str]:
    """`${given:NODE}`: the keys of a mapping whose values are set (not null), e.g. the splits of data_files."""
    return [str(key) for key, value in node.items() if value is not None]


if not OmegaConf.has_resolver("given"):
    OmegaConf.register_new_resolver("given", given_keys)
_print_resolved_config(sys.argv)
if getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", "").startswith("pipelines."):
    quote_brace_values(sys.argv)


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def _resolve(expected: tuple[type[BaseException] | str, ...]) -> tuple[type[BaseException], ...]:
    """Types, and 'module:Name' strings of modules already imported (an error of a module never imported
    cannot have been raised, so naming it costs the entry point no import)."""
    types = []
    for item in expected:
        if isinstance(item, str):
            module, _, name = item.partition(":")
            if module in sys.modules:
                types.append(getattr(sys.modules[module], name))
        else:
            types.append(item)
    return tuple(types)


def user_facing(exc: BaseException, expected: tuple[type[BaseException] | str, ...] = ()) -> BaseException | None:
    """The UserError (or `expected` error) that `exc` is or was raised from (`raise ... from`), else None."""
    types = (UserError, *_resolve(expected))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def describe(exc: BaseException) -> str:
    """One line for a user-facing error; an OS error names its file."""
    if isinstance(exc, OSError) and exc.filename and not isinstance(exc, UserError):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _report(module: str, exc: BaseException, line: str) -> None:
    # The traceback only on request: HYDRA_FULL_ERROR=1, or the module's debug log level (hydra.verbose=...).
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(exc)
    else:
        logging.getLogger(module).debug("details", exc_info=exc)
    print(line, file=sys.stderr)


def clean_errors(*expected: type[BaseException] | str) -> Callable:
    """Entry-point wrapper: UserError and `expected` errors -> one 'error: ...' line and exit 2; Ctrl-C and
    SIGTERM -> one 'interrupted ...' line and exit 130 / 143. Anything else keeps its traceback (a bug).

    `expected` holds types or 'module:Name' strings (resolved only when an error happens).
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
            try:
                return fn(*args, **kwargs)
            except MissingMandatoryValue as exc:
                print(f"error: {exc.full_key} is required: give it on the command line ({exc.full_key}=...)",
                      file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt as exc:
                signum = getattr(exc, "signum", signal.SIGINT)
                message = getattr(exc, "message", "") or "stopped before anything was written"
                _report(fn.__module__, exc, f"interrupted ({signal.Signals(signum).name}): {message}")
                sys.exit(128 + signum)
            except Exception as exc:
                found = user_facing(exc, expected)
                if found is None:
                    raise
                _report(fn.__module__, exc, f"error: {describe(found)}")
                sys.exit(2)
            finally:
                if main_thread:
                    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

        return inner

    return wrap
