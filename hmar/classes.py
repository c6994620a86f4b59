"""Class names and forgiving class lookup: `--class 207`, `--class "golden retriever"`, `--class Tabby`.

A model's config may carry its own `class_names`; 1000-class models without them use ImageNet-1k's
(the WordNet synonyms of each class, in `hmar/data/imagenet_classes.json`). A name matches any of a
class's synonyms ignoring case, spaces, hyphens and underscores, or a part of one when that part
belongs to a single class; a part shared by several classes lists them, and an unknown name gets
the nearest names suggested (and, for a model of few classes, all of them).
"""
from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from importlib import resources

from hmar.errors import InputError

SUGGESTIONS = 3
LISTED_MATCHES = 8  # an ambiguous name lists this many of the classes it matches
LISTED_CLASSES = 30  # an unknown name lists all of a model's classes when it has no more than this


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
    matches = lookup[wanted] if wanted in lookup else {i for name, ids in lookup.items() if wanted and wanted in name for i in ids}
    if len(matches) == 1:
        return matches.pop()
    if matches:
        raise InputError(f"class name {text!r} is ambiguous: it matches {_listed(sorted(matches), wanted, synonyms)}; "
                         "give more of the name or the number")
    nearest = difflib.get_close_matches(wanted, list(lookup), n=SUGGESTIONS, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(n) for n in nearest)}?" if nearest else ""
    if len(synonyms) <= LISTED_CLASSES:  # a model of few classes: all of them say more than a guess
        names = ", ".join(f"{index} {names[0]}" for index, names in enumerate(synonyms))
        listed = f"this model has {len(synonyms)} classes: {names}"
        hint = f"{hint} ({listed})" if hint else f"; {listed}"
    raise InputError(f"unknown class name {text!r}{hint}")


def _listed(indices: list[int], wanted: str, synonyms: tuple[tuple[str, ...], ...]) -> str:
    """The classes an ambiguous name matches, each by the synonym it matched and its number."""
    shown = []
    for index in indices[:LISTED_MATCHES]:
        name = next((n for n in synonyms[index] if wanted in _normal(n)), synonyms[index][0])
        shown.append(f"{name!r} ({index})")
    more = f" and {len(indices) - LISTED_MATCHES} more" if len(indices) > LISTED_MATCHES else ""
    return f"{len(indices)} classes: " + ", ".join(shown) + more
