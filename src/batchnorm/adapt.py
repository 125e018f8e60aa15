"""``batchnorm.adapt``: test-time adaptation through batch norm (AdaBN and TENT).

The implementation is :mod:`batchnorm.inference.adapt`; this module is its public name. See
docs/doctor.md.
"""

from batchnorm.inference.adapt import AdaBN, Tent, adabn, softmax_entropy, tent

__all__ = ["AdaBN", "Tent", "adabn", "softmax_entropy", "tent"]
