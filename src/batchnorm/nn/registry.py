"""Build a normalization layer by name: ``create_norm("gn", 64, num_groups=32)``.

Names (extend with :func:`register_norm`):

=========  ======================================================================================
``bn``     :class:`batchnorm.nn.BatchNorm1d/2d/3d` (``spatial_dims`` = 1, 2 or 3; default 2)
``sync``   :class:`batchnorm.nn.SyncBatchNorm`
``ghost``  :class:`batchnorm.nn.GhostBatchNorm` (``virtual_batch_size=``)
``renorm`` :class:`batchnorm.nn.BatchRenorm` (``r_max=``, ``d_max=``, ``warmup_steps=``, ...)
``frozen`` :class:`batchnorm.nn.FrozenBatchNorm`
``gn``     :class:`batchnorm.nn.GroupNorm` (``num_groups=``, default 32)
``ln``     :class:`batchnorm.nn.LayerNorm` over the last axis of size ``channels``; for (N, C, *)
           features normalized over (C, *) with per-channel affine, use ``gn`` with
           ``num_groups=1``
``in``     :class:`batchnorm.nn.InstanceNorm1d/2d/3d` (``spatial_dims``; default 2)
=========  ======================================================================================

Other keyword arguments go to the layer's constructor.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.frozen import FrozenBatchNorm
from batchnorm.nn.ghost import GhostBatchNorm
from batchnorm.nn.norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from batchnorm.nn.renorm import BatchRenorm
from batchnorm.nn.sync import SyncBatchNorm

__all__ = ["available_norms", "create_norm", "register_norm"]


def _by_spatial_dims(name: str, classes: dict[int, type]) -> Callable[..., torch.nn.Module]:
    def build(channels: int, spatial_dims: int = 2, **kwargs: Any) -> torch.nn.Module:
        if spatial_dims not in classes:
            raise ValueError(
                f"create_norm({name!r}): spatial_dims must be one of {sorted(classes)} (the Nd of "
                f"{classes[2].__name__[:-2]}Nd), got {spatial_dims!r}"
            )
        return classes[spatial_dims](channels, **kwargs)

    return build


def _group_norm(channels: int, num_groups: int = 32, **kwargs: Any) -> torch.nn.Module:
    if isinstance(num_groups, int) and num_groups > 0 and channels % num_groups:
        divisors = [g for g in (1, 2, 4, 8, 16, 32, 64) if channels % g == 0]
        raise ValueError(
            f"create_norm('gn', {channels}): {channels} channels cannot be split into "
            f"num_groups={num_groups} equal groups; pass num_groups= one of the divisors of "
            f"{channels}, e.g. {divisors}"
        )
    return GroupNorm(num_groups, channels, **kwargs)


_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {
    "bn": _by_spatial_dims("bn", {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}),
    "sync": SyncBatchNorm,
    "ghost": GhostBatchNorm,
    "renorm": BatchRenorm,
    "frozen": FrozenBatchNorm,
    "gn": _group_norm,
    "ln": LayerNorm,
    "in": _by_spatial_dims("in", {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}),
}


def available_norms() -> list[str]:
    """The names :func:`create_norm` knows, sorted.

    Example:
        >>> available_norms()
        ['bn', 'frozen', 'ghost', 'gn', 'in', 'ln', 'renorm', 'sync']
    """
    return sorted(_REGISTRY)


def register_norm(
    name: str, factory: Callable[..., torch.nn.Module], *, overwrite: bool = False
) -> None:
    """Add a name: ``factory(channels, **kwargs)`` must return the layer.

    Raises:
        ValueError: ``name`` is taken (unless ``overwrite``).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a norm name must be a non-empty string, got {name!r}")
    key = name.strip().lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"norm {key!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def create_norm(name: str, channels: int, **kwargs: Any) -> torch.nn.Module:
    """A normalization layer for ``channels`` features, by name.

    Args:
        name: One of :func:`available_norms` (case-insensitive).
        channels: Features / channels to normalize (``num_features``, ``num_channels`` or the
            last-axis size for layer norm).
        **kwargs: Passed to the layer (see the module docstring for each name's extras).

    Returns:
        The layer.

    Raises:
        ValueError: Unknown name (the message lists the known ones and the closest match), or
            arguments the layer rejects.
        TypeError: A keyword the layer does not take (the message names the layer).

    Example:
        >>> create_norm("gn", 64, num_groups=8)
        GroupNorm(8, 64, eps=1e-05, affine=True...)
        >>> create_norm("bnn", 64)
        Traceback (most recent call last):
        ...
        ValueError: unknown norm 'bnn' (did you mean 'bn'?); known: bn, frozen, ghost, gn, ...
    """
    if not isinstance(name, str):
        raise TypeError(f"create_norm: name must be a string such as 'bn', got {name!r}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown norm {name!r}{hint}; known: {', '.join(available_norms())}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"create_norm({key!r}): channels must be a positive int, got {channels!r}")
    factory = _REGISTRY[key]
    try:
        return factory(channels, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"create_norm({key!r}, {channels}) could not build {getattr(factory, '__name__', key)} "
            f"with {sorted(kwargs)}: {err}"
        ) from err
