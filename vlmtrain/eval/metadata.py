"""Class names and prompt templates of zero-shot classification sets, in CLIP_benchmark's shapes.

A *spec* names where they come from:

- a text file, one entry per line (``classnames.txt``, ``zeroshot_classification_templates.txt``);
- a JSON file mapping dataset names to lists, like CLIP_benchmark's ``en_classnames.json``
  (``{"cifar10": ["airplane", ...]}``) and ``en_zeroshot_classification_templates.json``
  (``{"cifar10": ["a photo of a {c}.", ...]}``); the dataset's own name picks the list, and a
  file holding a single list serves any dataset;
- a built-in name: ``imagenet`` (OpenAI's 1000 ImageNet class names; as templates, OpenAI's 80
  prompts) or ``imagenet_simple`` (templates only: open_clip's 7-prompt subset). These ship
  with open_clip (``open_clip.zero_shot_metadata``), so they work offline.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from vlmtrain.errors import EvalDataError

Template = str | Callable[[str], str]

# File stems looked for inside a dataset directory (CLIP_benchmark's names), .txt or .json.
CLASSNAMES_STEM = "classnames"
TEMPLATES_STEM = "zeroshot_classification_templates"
METADATA_SUFFIXES = (".txt", ".json")

BUILTIN_CLASSNAMES: dict[str, Sequence[str]] = {"imagenet": IMAGENET_CLASSNAMES}
BUILTIN_TEMPLATES: dict[str, Sequence[Template]] = {
    "imagenet": OPENAI_IMAGENET_TEMPLATES,
    "imagenet_simple": SIMPLE_IMAGENET_TEMPLATES,
}

CLASSNAMES_WHAT = "class names"
TEMPLATES_WHAT = 'prompt templates containing "{c}"'


def find_metadata_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem.txt`` or ``directory/stem.json``, whichever exists (txt first)."""
    for suffix in METADATA_SUFFIXES:
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    return None


def _read_lines(path: Path, what: str) -> list[str]:
    """Stripped non-blank lines of a metadata file, which must not be empty.

    Blank lines are only tolerated at the end: in the middle of classnames.txt one
    would shift every following class index.
    """
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise EvalDataError(f"{path} is empty: write {what} into it, one per line")
    if "" in lines:
        raise EvalDataError(
            f"{path} line {lines.index('') + 1} is blank: remove it, every line must hold one of {what}"
        )
    return lines


def _read_json_list(path: Path, dataset: str, what: str) -> list[str]:
    """The list stored under ``dataset`` in a CLIP_benchmark-style JSON mapping."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise EvalDataError(f'{path} must map dataset names to lists of {what}, e.g. {{"{dataset}": [...]}}')
    if dataset in mapping:
        key = dataset
    elif len(mapping) == 1:
        (key,) = mapping
    else:
        raise EvalDataError(f"{path} has no entry for dataset {dataset!r}; it has: {', '.join(sorted(mapping))}")
    entries = mapping[key]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and e.strip() for e in entries):
        raise EvalDataError(f"{path} entry {key!r} must be a non-empty list of non-empty strings ({what})")
    return [entry.strip() for entry in entries]


def _read_spec(spec: str | Path, dataset: str, what: str, builtins: dict[str, Sequence]) -> list:
    """Entries from a built-in name, a .json mapping or a text file."""
    path = Path(spec)
    if not path.is_file():
        if str(spec) in builtins:
            return list(builtins[str(spec)])
        raise EvalDataError(
            f"{what}: {spec} is neither a file nor a built-in name (built-in: {', '.join(builtins)})"
        )
    if path.suffix == ".json":
        return _read_json_list(path, dataset, what)
    return _read_lines(path, what)


def load_classnames(spec: str | Path, dataset: str) -> list[str]:
    """Class names in class-index order (line/entry i names class i)."""
    return _read_spec(spec, dataset, CLASSNAMES_WHAT, BUILTIN_CLASSNAMES)


def load_templates(spec: str | Path, dataset: str) -> list[Template]:
    """Prompt templates; strings must hold CLIP_benchmark's ``{c}`` (or open_clip's ``{}``)."""
    templates = _read_spec(spec, dataset, TEMPLATES_WHAT, BUILTIN_TEMPLATES)
    unit = "entry" if Path(spec).suffix == ".json" else "line"
    for number, template in enumerate(templates, start=1):
        if isinstance(template, str) and "{c}" not in template and "{}" not in template:
            raise EvalDataError(
                f'{spec} {unit} {number} ({template!r}) has no "{{c}}" placeholder for the class name'
            )
    return templates


def resolve_classnames_and_templates(
    directory: Path,
    dataset: str,
    classnames: str | Path | None = None,
    templates: str | Path | None = None,
    default_classnames: Sequence[str] | None = None,
) -> tuple[list[str], list[Template]]:
    """Given specs win, then the dataset directory's own files, then ``default_classnames``."""
    classnames = classnames or find_metadata_file(directory, CLASSNAMES_STEM)
    templates = templates or find_metadata_file(directory, TEMPLATES_STEM)
    if classnames is None and default_classnames is None:
        raise EvalDataError(
            f"no class names for dataset {dataset!r}: expected {directory / CLASSNAMES_STEM}.txt (one per line) "
            f"or .json, or give them (--classnames FILE or a built-in name: {', '.join(BUILTIN_CLASSNAMES)})"
        )
    if templates is None:
        raise EvalDataError(
            f"no prompt templates for dataset {dataset!r}: expected {directory / TEMPLATES_STEM}.txt "
            f"(one per line) or .json, or give them (--templates FILE or a built-in name: "
            f"{', '.join(BUILTIN_TEMPLATES)})"
        )
    names = load_classnames(classnames, dataset) if classnames is not None else list(default_classnames)
    return names, load_templates(templates, dataset)
