"""Drop-in torch layers: ``BatchNorm1d/2d/3d`` and the ``convert`` helper.

Example:
    >>> import torch
    >>> import batchnorm.nn as bnn
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> model = bnn.convert(model)
    >>> type(model[1]).__module__
    'batchnorm.nn.batchnorm'
"""

from batchnorm.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from batchnorm.nn.convert import convert

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "convert",
]

# Variants beyond one device and one batch, on the shared primitives (torch operations).
from batchnorm.nn.frozen import FrozenBatchNorm, FrozenBatchNormAct, unfreeze_batchnorm  # noqa: E402
from batchnorm.nn.ghost import GhostBatchNorm  # noqa: E402
from batchnorm.nn.norm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d  # noqa: E402
from batchnorm.nn.norms import (  # noqa: E402
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LazyInstanceNorm1d,
    LazyInstanceNorm2d,
    LazyInstanceNorm3d,
)
from batchnorm.nn.registry import available_norms, create_norm, register_norm  # noqa: E402
from batchnorm.nn.renorm import BatchRenorm  # noqa: E402
from batchnorm.nn.sync import (  # noqa: E402
    SyncBatchNorm,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)

__all__ += [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm",
    "FrozenBatchNorm",
    "FrozenBatchNormAct",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "available_norms",
    "convert_sync_batchnorm",
    "create_norm",
    "register_norm",
    "revert_sync_batchnorm",
    "unfreeze_batchnorm",
]

# torch.ao (fuse_modules, FX quantization) and torch.fx.experimental.optimization find what to
# do with a module by its exact class: teach them ours.
from batchnorm.nn.fusion import (  # noqa: E402
    register_fusion_patterns,
    register_fx_optimization_types,
    register_quantization_types,
)

register_fusion_patterns()
register_quantization_types()
register_fx_optimization_types()
