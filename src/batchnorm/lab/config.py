"""Experiment configurations: dataclasses with documented defaults, and ``--set key=value``.

Each experiment's ``Config`` is a frozen dataclass whose fields are declared with :func:`param`,
which records a help text (and, for strings, the allowed choices). :func:`apply_overrides`
turns ``["lr=0.5", "hidden=(100,100)"]`` into a new config, converting each value to the field's
declared type and rejecting unknown keys and bad values with a message that says what is
allowed. :func:`check_config` then checks the fields that mean the same in every experiment
(seeds, thread count, example and batch counts; see :data:`COMMON_FIELD_RULES`), and a config
may define ``validate(self)`` for its own checks across fields; both run after every override
and on every config a resumed run reloads.

Accepted value spellings: ``int``/``float`` as Python literals (``1e-3``, ``50_000``); ``bool``
as true/false/yes/no/on/off/1/0; ``str`` as is; tuples as comma-separated lists, with or
without brackets (``0.1,0.5`` or ``(0.1, 0.5)``); ``none`` for optional fields.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     lr: float = param(0.1, "learning rate")
    ...     sizes: tuple[int, ...] = param((100, 100), "hidden widths")
    ...     act: str = param("sigmoid", "nonlinearity", choices=("sigmoid", "relu"))
    >>> apply_overrides(Demo(), ["lr=0.5", "sizes=32,32,32"])
    Demo(lr=0.5, sizes=(32, 32, 32), act='sigmoid')
    >>> apply_overrides(Demo(), ["act=tanh"])
    Traceback (most recent call last):
    ...
    batchnorm.lab.config.ConfigError: act: 'tanh' is not one of sigmoid, relu
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, Union

__all__ = [
    "RunConfig",
    "SeedsConfig",
    "DataConfig",
    "ConfigError",
    "param",
    "parse_assignment",
    "parse_value",
    "apply_overrides",
    "check_config",
    "available_cores",
    "COMMON_FIELD_RULES",
    "field_docs",
    "config_to_dict",
]

C = TypeVar("C")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class ConfigError(ValueError):
    """A ``--set`` override names an unknown key or gives a value of the wrong type."""


def _datasets() -> tuple[str, ...]:
    from batchnorm.lab.data import DATASETS

    return DATASETS


def param(default: Any, help: str, *, choices: Sequence[str] | None = None) -> Any:
    """A dataclass field with a default, a help text and optional choices (for str fields)."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------
# The root configs: every experiment's config extends one of these three


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every run has: its first seed and its torch CPU threads.

    The configs form one family: :class:`RunConfig` (seed, threads) for experiments that draw one
    set of random instances (``theorems``); :class:`SeedsConfig` adds the number of seeds, each
    a repetition of the whole protocol (``decoupling``); :class:`DataConfig` adds the data set
    and its subsets, for every experiment that trains on real data. An experiment redeclares a
    field only to change its default (e.g. ``threads=1`` for single-threaded numerics).
    ``check_config`` checks these fields for every experiment alike
    (:data:`COMMON_FIELD_RULES`).
    """

    seed: int = param(0, "the first seed; the seeds are seed, seed+1, ...")
    threads: int = param(0, "torch CPU threads (0 = as many as there are idle cores)")


@dataclasses.dataclass(frozen=True)
class SeedsConfig(RunConfig):
    """A run repeated over ``seeds`` seeds: seed, seed+1, ..."""

    seeds: int = param(3, "number of seeds (each: initial weights and data order)")

    def seed_list(self) -> list[int]:
        """The seeds of the run, in order.

        >>> SeedsConfig(seed=5, seeds=3).seed_list()
        [5, 6, 7]
        """
        return [self.seed + i for i in range(self.seeds)]


@dataclasses.dataclass(frozen=True)
class DataConfig(SeedsConfig):
    """A seeded run on a data set (:data:`batchnorm.lab.data.DATASETS`), optionally a subset."""

    dataset: str = param("mnist", "data set", choices=_datasets())
    train_subset: int | None = param(None, "use only this many training examples (none = all)")
    test_subset: int | None = param(None, "use only this many test examples (none = all)")


def parse_assignment(text: str) -> tuple[str, str]:
    """Split ``key=value``; the key is stripped and dashes become underscores.

    >>> parse_assignment("eval-every = 500")
    ('eval_every', '500')
    """
    if "=" not in text:
        raise ConfigError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"missing key in {text!r}")
    return key, value.strip()


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def parse_value(text: str, tp: Any, name: str = "value") -> Any:
    """Convert ``text`` to type ``tp`` (int, float, bool, str, tuple[X, ...], X | None).

    >>> parse_value("1e-3", float)
    0.001
    >>> parse_value("(1, 2)", tuple[int, ...])
    (1, 2)
    >>> parse_value("none", int | None)
    """
    optional, tp = _is_optional(tp)
    stripped = text.strip()
    if optional and stripped.lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item_type = args[0]
        elif args:
            raise ConfigError(f"{name}: fixed-length tuple fields are not supported")
        else:
            item_type = str
        inner = stripped
        if inner[:1] in "([" and inner[-1:] in ")]":
            inner = inner[1:-1]
        items = [part.strip() for part in inner.split(",") if part.strip()]
        return tuple(parse_value(item, item_type, name) for item in items)
    if tp is bool:
        lowered = stripped.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{name}: {text!r} is not a boolean (use true or false)")
    if tp is int:
        try:
            return int(stripped.replace("_", ""), 0) if stripped else int("")
        except ValueError:
            try:
                as_float = float(stripped)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)  # "5e4" is an integer too
            raise ConfigError(f"{name}: {text!r} is not an integer") from None
    if tp is float:
        try:
            return float(stripped.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not a number") from None
    if tp is str:
        return stripped
    raise ConfigError(f"{name}: fields of type {tp!r} cannot be set from the command line")


MAX_SEED = 2**31 - 1

# The fields that mean the same in every experiment's config, by name: (smallest value, what it
# is). A value of None (for optional fields) is always allowed. Names ending in "_seed" or
# "_seeds" follow the rule of "seed" or "seeds".
COMMON_FIELD_RULES: dict[str, tuple[int, str]] = {
    "seed": (0, "a seed"),
    "seeds": (1, "a number of seeds"),
    "threads": (0, "a thread count (0 = automatic)"),
    "eval_examples": (1, "a number of examples"),
    "popstat_batches": (1, "a number of batches"),
    "final_popstat_batches": (1, "a number of batches (none = one pass over the training set)"),
    "train_subset": (1, "a number of examples (none = all)"),
    "test_subset": (1, "a number of examples (none = all)"),
}


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _rule(name: str) -> tuple[int, str] | None:
    if name in COMMON_FIELD_RULES:
        return COMMON_FIELD_RULES[name]
    for suffix in ("seed", "seeds"):
        if name.endswith("_" + suffix):
            return COMMON_FIELD_RULES[suffix]
    return None


def check_config(config: C, *, note: Any = None) -> C:
    """Check a config as every experiment's is checked, then run its own ``validate()``.

    The fields named in :data:`COMMON_FIELD_RULES` must be integers at or above their smallest
    value (seeds also at most 2**31 - 1), and a ``train_subset`` must hold at least one
    ``batch_size``. A ``threads`` above the cores this process may use is
    capped to them, with a note: more threads than cores only slow a run down (and a huge
    number crashes OpenMP).

    Args:
        config: a config dataclass instance.
        note: called with the text of each note (default: a log line on stderr).

    Returns:
        The config, with ``threads`` capped where needed.

    Raises:
        ConfigError: the first field that breaks a rule, or a failed ``validate()``.
    """
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        rule = _rule(f.name)
        value = getattr(config, f.name)
        if rule is None or value is None:
            continue
        least, what = rule
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{f.name} must be an integer ({what}), got {value!r}")
        if value < least:
            raise ConfigError(f"{f.name} must be at least {least} ({what}), got {value}")
        if f.name == "seed" or f.name.endswith("_seed"):
            if value > MAX_SEED:
                raise ConfigError(f"{f.name} must be at most 2**31 - 1 = {MAX_SEED}, got {value}")
        if f.name == "threads" and value > available_cores():
            cores = available_cores()
            if note is None:
                from batchnorm.lab.progress import log as note
            note(
                f"note: threads={value} is more than the {cores} CPU core(s) this process may "
                f"use; using threads={cores}"
            )
            changes["threads"] = cores
    if changes:
        config = dataclasses.replace(config, **changes)  # type: ignore[type-var]
    subset, batch = getattr(config, "train_subset", None), getattr(config, "batch_size", None)
    if isinstance(subset, int) and isinstance(batch, int) and subset < batch:
        raise ConfigError(
            f"train_subset ({subset}) must hold at least one batch ({batch}): raise "
            "train_subset or lower batch_size"
        )
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return config


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_overrides(config: C, overrides: Sequence[str] | Mapping[str, str]) -> C:
    """A copy of ``config`` with ``key=value`` overrides applied, converted and checked.

    Raises:
        ConfigError: unknown key (with the closest valid names), a value of the wrong type, a
            value outside the field's choices, or a failed :func:`check_config`.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError("config must be a dataclass instance")
    pairs = (
        list(overrides.items())
        if isinstance(overrides, Mapping)
        else [parse_assignment(o) for o in overrides]
    )
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = _hints(type(config))
    changes: dict[str, Any] = {}
    for key, text in pairs:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown key {key!r} for {type(config).__name__}{hint} "
                f"(valid keys: {', '.join(fields)})"
            )
        value = parse_value(text, hints[key], key)
        choices = fields[key].metadata.get("choices")
        if choices:
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if v not in choices:
                    raise ConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}")
        changes[key] = value
    new = dataclasses.replace(config, **changes)  # type: ignore[type-var]
    return check_config(new)


def _type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        name = f"{getattr(args[0], '__name__', args[0])} list" if args else "list"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def field_docs(config_or_cls: Any) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field, for ``batchnorm lab list --verbose``."""
    cls = config_or_cls if isinstance(config_or_cls, type) else type(config_or_cls)
    hints = _hints(cls)
    instance = config_or_cls if not isinstance(config_or_cls, type) else cls()
    rows = []
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" (one of: {', '.join(f.metadata['choices'])})"
        rows.append((f.name, _type_name(hints[f.name]), getattr(instance, f.name), help_text))
    return rows


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict (tuples become lists in JSON)."""
    return dataclasses.asdict(config)
