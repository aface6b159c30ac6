"""`python -m pipelines.upgrade DIR [DIR ...]`: convert embed output directories of the layout before 0.2.0 in place.

Before 0.2.0: `embeddings.json`, `summary*.json`, `<split>/part-*.parquet`, `<split>/errors.jsonl` and
`validation/`. Now (pipelines.store): `_embeddings.json`, `_summary*.json`, `split=<split>/part-*.parquet`,
`split=<split>/_errors.jsonl`, and the validation outputs in the sibling `<DIR>-validation/`. Renames only: no
part is rewritten; safe to rerun after an interruption; refused while a job writes into the directory.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipelines import store
from pipelines.config import clean_errors

log = logging.getLogger(__name__)


def upgrade(output_dir: str | Path) -> str:
    """Convert one directory; a line saying what was done."""
    renames = store.upgrade_layout(output_dir)
    if not renames:
        return f"{output_dir}: already in the current layout, nothing to do"
    folders = sum(dst.is_dir() for _, dst in renames)
    return f"{output_dir}: converted ({len(renames)} renames, {folders} folders); readers now open it whole"


@clean_errors(FileNotFoundError, PermissionError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.upgrade", description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", metavar="DIR", help="an embed job's output_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for output_dir in args.output_dirs:
        print(upgrade(output_dir))


if __name__ == "__main__":
    main()
