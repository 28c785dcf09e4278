"""Settings checked before any work starts: a small vocabulary of rules and one checker.

A rule is a function of a value that returns what is wrong with it, or None. Tables of rules,
keyed by dotted setting paths (`data.batch_size`, `logger.*.log_model`), say what each setting
accepts (train/settings.py holds the tables of the Hydra configs); `check` runs a table over a
config and raises one UserError naming every wrong setting, its value and what is allowed:

    data.batch_size=0: must be a positive integer

`argument` turns a rule into an argparse type, so `python -m data` speaks the same language.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

from data.errors import UserError

Rule = Callable[[object], str | None]
# A relation between settings: the config in, (setting, problem) pairs out.
Relation = Callable[[Mapping], list[tuple[str, str]]]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML's true is no batch size


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int | None = None, high: int | None = None, *, also: Sequence[int] = ()) -> Rule:
    """An integer in [low, high]; `also` lists special values besides (-1: no limit)."""
    if low == 1 and high is None:
        want = "a positive integer"
    elif low is not None and high is None:
        want = f"an integer >= {low}"
    elif low is not None:
        want = f"an integer from {low} to {high}"
    else:
        want = "an integer"
    if also:
        want += f" (or {', '.join(map(str, also))})"

    def rule(v: object) -> str | None:
        ok = _is_int(v) and (v in also or ((low is None or v >= low) and (high is None or v <= high)))
        return None if ok else f"must be {want}"

    return rule


def number(
    low: float | None = None, high: float | None = None, *, open_low: bool = False, open_high: bool = False
) -> Rule:
    """A finite number from low to high; an open end excludes its bound."""
    if low is not None and high is not None:
        want = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low is not None:
        want = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        want = "a number"

    def rule(v: object) -> str | None:
        if not _is_number(v):
            return f"must be {want}"
        below = low is not None and (v <= low if open_low else v < low)
        above = high is not None and (v >= high if open_high else v > high)
        return f"must be {want}" if below or above else None

    return rule


def flag(v: object) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def text(v: object) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"


def choice(*allowed: object) -> Rule:
    shown = ", ".join(str(a) for a in allowed)

    def rule(v: object) -> str | None:
        if any(v == a and type(v) is type(a) for a in allowed):
            return None
        close = difflib.get_close_matches(str(v), [str(a) for a in allowed], n=1, cutoff=0.6)
        return f"must be one of {shown}" + (f" (did you mean {close[0]}?)" if close else "")

    return rule


def optional(rule: Rule) -> Rule:
    """`rule`, or null."""

    def either_null(v: object) -> str | None:
        problem = None if v is None else rule(v)
        return problem and f"{problem}, or null"

    return either_null


def either(*rules: Rule) -> Rule:
    """Accepted when one of `rules` accepts; otherwise what each of them wants."""

    def any_of(v: object) -> str | None:
        problems = [r(v) for r in rules]
        if any(p is None for p in problems):
            return None
        return problems[0] + "".join(f"; or {p.removeprefix('must be ')}" for p in problems[1:])

    return any_of


def span(item: Rule) -> Rule:
    """A [low, high] pair of values that each pass `item`, low not above high."""

    def rule(v: object) -> str | None:
        if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != 2:
            return "must be a pair [low, high]"
        problem = next((p for p in map(item, v) if p), None)
        if problem:
            return f"each end {problem}"
        if v[0] > v[1]:
            return f"the low end {show(v[0])} is above the high end {show(v[1])}: give [low, high]"
        return None

    return rule


def each(item: Rule) -> Rule:
    """A list whose every entry passes `item`."""

    def rule(v: object) -> str | None:
        if not isinstance(v, Sequence) or isinstance(v, str):
            return "must be a list"
        problem = next((f"entry {show(x)} {p}" for x in v if (p := item(x))), None)
        return problem

    return rule


def existing_file(v: object) -> str | None:
    if not isinstance(v, str) or not v:
        return "must be the path of a local file"
    return None if os.path.isfile(v) else "no such file (give a local file's path)"


def show(value: object) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def _lookup(config: Mapping, path: str) -> Iterator[tuple[str, object]]:
    """(full path, value) of every setting `path` names; `*` matches each key at its level.
    A setting absent from the config (its group not chosen) yields nothing."""
    head, _, rest = path.partition(".")
    for key in list(config) if head == "*" else [head]:
        if key not in config:
            continue
        value = config[key]
        if not rest:
            yield str(key), value
        elif isinstance(value, Mapping):
            for sub, v in _lookup(value, rest):
                yield f"{key}.{sub}", v


def _unknown(group: Mapping, where: str, known: Sequence[str]) -> list[tuple[str, str]]:
    problems = []
    for key in group:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {where}.{close[0]}?" if close else f"it takes {', '.join(known)}"
            problems.append((f"{where}.{key}", f"not a setting ({hint})"))
    return problems


def unknown_keys(config: Mapping, path: str, known: Sequence[str]) -> list[tuple[str, str]]:
    """Keys of the group at `path` that are not in `known`, with the closest known name."""
    groups = [(where, g) for where, g in _lookup(config, path) if isinstance(g, Mapping)]
    return [p for where, g in groups for p in _unknown(g, where, known)]


def target_keys(config: Mapping, path: str) -> list[tuple[str, str]]:
    """Keys of a `_target_` group that its target's constructor does not take: Hydra would pass
    them on and the constructor would fail with a TypeError."""
    from hydra.utils import get_object

    problems = []
    for where, group in _lookup(config, path):
        if not isinstance(group, Mapping) or "_target_" not in group:
            continue
        try:
            params = inspect.signature(get_object(group["_target_"])).parameters
        except Exception:
            problems.append((f"{where}._target_", f"cannot import {group['_target_']}"))
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue  # takes anything
        known = [n for n in params if n != "self"] + ["_target_", "_partial_", "_recursive_", "_convert_"]
        problems += _unknown(group, where, known)
    return problems


def check(config: Mapping, rules: Mapping[str, Rule], relations: Sequence[Relation] = ()) -> None:
    """Raise one UserError listing every setting of `config` that breaks its rule or a relation."""
    problems = []
    for path, rule in rules.items():
        for where, value in _lookup(config, path):
            problem = rule(value)
            if problem:
                problems.append(f"{where}={show(value)}: {problem}")
    for relation in relations:
        for where, problem in relation(config):
            values = [v for _, v in _lookup(config, where)]
            problems.append(f"{where}={show(values[0])}: {problem}" if values else f"{where}: {problem}")
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} settings are wrong: " + "; ".join(problems))


def argument(rule: Rule, convert: Callable[[str], object] = int) -> Callable[[str], object]:
    """An argparse `type=` that converts the text and applies `rule`; argparse then prints
    `argument --workers: 0: must be a positive integer` and exits 2."""

    def parse(text: str) -> object:
        try:
            value = convert(text)
        except ValueError:
            value = text
        problem = rule(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value

    return parse
