"""The numbers an experiment's verdicts are decided on, saved so that a run can be judged again.

Every experiment is split in two (see :mod:`batchnorm.lab.experiment`): ``measure`` trains and
evaluates and returns, among the rest of its report, a *numbers* dataclass holding everything its
claims are decided on; ``judge`` is a pure function of that dataclass alone (no training, no file
access, no randomness). The run saves the numbers as ``numbers.json`` (with its SHA-256 beside it,
:func:`batchnorm.lab.io.write_checked_json`), and ``batchnorm lab judge RUN_DIR`` decides the
claims again from that file.

The file keeps every float exactly, including the non-finite ones JSON has no spelling for (a
diverged loss, a target never reached): they are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"``, so a re-judged run decides on the very numbers the run decided on. Reading checks the
file against the numbers dataclass's type annotations (``float``, ``int``, ``bool``, ``str``,
``list[X]``, ``tuple[X, ...]``, ``dict[K, V]``, ``X | None``, nested dataclasses) and refuses
anything else with :class:`NumbersError`, naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["NumbersError", "numbers_to_json", "numbers_from_json", "NUMBERS_FORMAT"]

NUMBERS_FORMAT = 1
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class NumbersError(ValueError):
    """Saved numbers that do not fit the experiment's numbers dataclass."""


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {_encode_key(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "tolist"):  # NumPy scalars and arrays
        return _encode(value.tolist())
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    raise NumbersError(f"cannot save a {type(value).__name__} among the numbers: {value!r}")


def _encode_key(key: Any) -> str:
    if hasattr(key, "item"):
        key = key.item()
    if isinstance(key, bool) or not isinstance(key, (str, int, float)):
        raise NumbersError(f"a numbers mapping key must be a str, int or float, got {key!r}")
    return repr(key) if isinstance(key, float) else str(key)


def numbers_to_json(numbers: Any) -> dict[str, Any]:
    """A numbers dataclass as a JSON object (non-finite floats as strings, see the module).

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class N:
    ...     acc: list[float]
    ...     steps: int
    >>> numbers_to_json(N([0.5, float("inf")], 3))
    {'acc': [0.5, 'inf'], 'steps': 3}
    """
    if not (dataclasses.is_dataclass(numbers) and not isinstance(numbers, type)):
        raise NumbersError(f"numbers must be a dataclass instance, got {type(numbers).__name__}")
    return _encode(numbers)


def numbers_from_json(cls: type, data: Any) -> Any:
    """Rebuild a numbers dataclass from :func:`numbers_to_json` output, checking every field.

    Raises:
        NumbersError: a missing or unknown field, or a value of the wrong type; the message names
            the field.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class N:
    ...     acc: list[float]
    ...     steps: int
    >>> numbers_from_json(N, {"acc": [0.5, "inf"], "steps": 3})
    N(acc=[0.5, inf], steps=3)
    """
    return _decode(data, cls, "numbers")


def _decode(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(value, tp, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return _decode(value, option, where)
            except NumbersError as exc:
                errors.append(str(exc))
        raise NumbersError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no type")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            raise NumbersError(f"{where}: expected a list, got {_show(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise NumbersError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _decode(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))
            )
        item = args[0] if args else Any
        items = [_decode(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise NumbersError(f"{where}: expected an object, got {_show(value)}")
        key_type, value_type = args if args else (str, Any)
        return {
            _decode_key(k, key_type, where): _decode(v, value_type, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, str) and value in _NON_FINITE:
            return _NON_FINITE[value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise NumbersError(f"{where}: expected a number, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise NumbersError(f"{where}: expected an integer, got {_show(value)}")
    if tp in (bool, str):
        if isinstance(value, tp):
            return value
        raise NumbersError(f"{where}: expected a {tp.__name__}, got {_show(value)}")
    raise NumbersError(f"{where}: cannot read a field of type {tp!r}")  # pragma: no cover


def _decode_key(key: str, tp: Any, where: str) -> Any:
    try:
        if tp is float:
            return float(key)
        if tp is int:
            return int(key)
    except ValueError:
        raise NumbersError(f"{where}: key {key!r} is not a {tp.__name__}") from None
    return key


def _decode_dataclass(value: Any, cls: type, where: str) -> Any:
    if not isinstance(value, dict):
        raise NumbersError(f"{where}: expected an object, got {_show(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise NumbersError(f"{where}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in value
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise NumbersError(f"{where}: missing field(s) {', '.join(missing)}")
    kwargs = {k: _decode(v, hints[k], f"{where}.{k}") for k, v in value.items()}
    return cls(**kwargs)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
