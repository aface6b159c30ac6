"""Class names for zero-shot prompts, from a file or from the class folder names.

Two file formats, told apart line by line:
    n01440764 tench, Tinca tinca        ImageNet's LOC_synset_mapping.txt: the label, a space, comma-separated
                                        lemmas; the name is the first lemma ("tench")
    n01440764<TAB>tench                 any `<label>\t<name>` file: the name as written (OpenAI's ImageNet names,
                                        your own), commas and all
Without a file (or for a label the file does not hold) the folder name is the name, underscores as spaces
("ankle_boot" -> "ankle boot"). The file is found as validate finds its own (`report.find_class_names`); the
report shows a file's names whole, while a prompt takes the first lemma.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from pipelines.errors import UserError

log = logging.getLogger(__name__)


def read_names(path: Path) -> dict[str, str]:
    """A class-name file -> {label: name}; a line without a name, or naming a label a second time, is refused
    (UserError naming the line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"class_names={path}: cannot read it ({exc})") from exc
    names: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" in line:
            label, _, name = line.partition("\t")
        else:
            label, _, lemmas = line.strip().partition(" ")
            name = lemmas.split(",")[0]
        if not label.strip() or not name.strip():
            raise UserError(f"{path}:{number}: expected '<label> <name>[, <name> ...]' or '<label><TAB><name>', "
                            f"got {line!r}")
        label = label.strip()
        if label in lines:
            raise UserError(f"{path}:{number}: label {label!r} is named again (first on line {lines[label]}); "
                            "keep one line per label")
        names[label], lines[label] = name.strip(), number
    return names


def folder_name(label: str) -> str:
    """A class folder's name as words: 'ankle_boot' -> 'ankle boot'."""
    return label.replace("_", " ").strip() or label


def names_for(labels: list[str], file: Path | None) -> list[str]:
    """One name per label, in the order given: from `file` when it holds the label, else from the folder name.
    Names shared by several labels (ImageNet's first lemmas: two 'crane's, two 'maillot's) are logged."""
    table = read_names(file) if file is not None else {}
    missing = [label for label in labels if label not in table]
    if file is not None and missing:
        log.warning("%s holds no name for %d of %d classes (e.g. %s): their folder names are used", file,
                    len(missing), len(labels), missing[0])
    names = [table.get(label) or folder_name(label) for label in labels]
    shared = sorted(name for name, n in Counter(names).items() if n > 1)
    if shared:
        log.warning("%d names stand for more than one class (e.g. %r): those classes get the same prompts",
                    len(shared), shared[0])
    return names
