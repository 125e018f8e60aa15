"""Exceptions that are instances of what PyTorch raises for the same mistake, with better messages.

A drop-in layer must raise where ``torch.nn`` raises, and code written against torch catches
torch's exception classes (``except RuntimeError``). PyTorch is not consistent about those: a
wrong number of dimensions is a ``ValueError``, a channel-count mismatch a ``RuntimeError``, an
integer input a ``NotImplementedError``, a list instead of a tensor an ``AttributeError``. Each
class here derives from the exception the project has always raised (``ValueError`` or
``TypeError``) *and* from torch's, so both kinds of ``except`` clause keep working.

Example:
    >>> import torch
    >>> from batchnorm.nn import BatchNorm1d
    >>> try:
    ...     BatchNorm1d(3)(torch.randn(4, 5))
    ... except RuntimeError as error:  # torch raises RuntimeError here
    ...     print(type(error).__name__, isinstance(error, ValueError))
    NormInputError True
"""

from __future__ import annotations

__all__ = [
    "GroupCountError",
    "NormDtypeError",
    "NormInputError",
    "NormRankError",
    "NotATensorError",
]


class NormInputError(ValueError, RuntimeError):
    """A shape or value the normalization cannot take (wrong axes, channel count, statistics)."""


class NormRankError(NormInputError, IndexError):
    """An input with fewer than the two axes (N, C) that batch norm needs (torch's functional
    batch norm raises ``IndexError`` there, looking for the channel axis)."""


class NormDtypeError(TypeError, NotImplementedError):
    """An unsupported or mismatched dtype (torch raises ``NotImplementedError`` for integer
    inputs and ``RuntimeError``, of which that is a subclass, for mixed dtypes)."""


class NotATensorError(TypeError, AttributeError):
    """Something other than a tensor where a tensor is expected (torch: ``AttributeError``)."""


class GroupCountError(ValueError, ZeroDivisionError):
    """``GroupNorm`` with ``num_groups = 0`` (torch: ``ZeroDivisionError``)."""
