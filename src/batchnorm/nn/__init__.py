"""Drop-in torch layers: ``BatchNorm1d/2d/3d`` and the ``convert`` helper.

Example:
    >>> import torch
    >>> import batchnorm.nn as bnn
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> model = bnn.convert(model)
    >>> type(model[1]).__module__
    'batchnorm.nn.batchnorm'
"""

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.convert import convert

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]
