"""Class names and forgiving class lookup: `--class 207`, `--class "golden retriever"`, `--class Tabby`.

A model's config may carry its own `class_names`; 1000-class models without them use ImageNet-1k's
(the WordNet synonyms of each class, in `hmar/data/imagenet_classes.json`). A name matches any of a
class's synonyms ignoring case, spaces, hyphens and underscores; an unknown name gets the nearest
names suggested.
"""
from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from importlib import resources

from hmar.errors import InputError

SUGGESTIONS = 3


@lru_cache(maxsize=1)
def imagenet_synonyms() -> tuple[tuple[str, ...], ...]:
    text = resources.files("hmar").joinpath("data/imagenet_classes.json").read_text()
    return tuple(tuple(names) for names in json.loads(text))


def synonyms_for(num_classes: int, class_names=None) -> tuple[tuple[str, ...], ...]:
    """Per class, the names it answers to (first = display name)."""
    if class_names is not None:
        return tuple((str(n),) for n in class_names)
    if num_classes == 1000:
        return imagenet_synonyms()
    return tuple((f"class {i}",) for i in range(num_classes))


def display_name(index: int, num_classes: int, class_names=None) -> str:
    if index == num_classes:
        return "unconditional"
    return synonyms_for(num_classes, class_names)[index][0]


def _normal(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def resolve_class(value: int | str, num_classes: int, class_names=None) -> int:
    """A class index from an int or a name; InputError naming the problem otherwise."""
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if not 0 <= index < num_classes:
            raise InputError(f"class {index} is out of range: this model has classes 0..{num_classes - 1}")
        return index
    synonyms = synonyms_for(num_classes, class_names)
    wanted = _normal(text)
    lookup: dict[str, set[int]] = {}
    for index, names in enumerate(synonyms):
        for name in names:
            lookup.setdefault(_normal(name), set()).add(index)
    if wanted in lookup and len(lookup[wanted]) == 1:
        return next(iter(lookup[wanted]))
    if wanted in lookup:
        raise InputError(f"class name {text!r} is ambiguous: classes {sorted(lookup[wanted])}; give the number")
    containing = {i for name, ids in lookup.items() if wanted and wanted in name for i in ids}
    if len(containing) == 1:
        return containing.pop()
    nearest = difflib.get_close_matches(wanted, list(lookup), n=SUGGESTIONS, cutoff=0.5)
    if not nearest and containing:
        nearest = sorted(n for n, ids in lookup.items() if wanted in n)[:SUGGESTIONS]
    hint = f"; did you mean {', '.join(repr(n) for n in nearest)}?" if nearest else ""
    raise InputError(f"unknown class name {text!r}{hint}")
