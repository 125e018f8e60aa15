"""The mathematics behind the later explanations of batch norm (SPEC.md sections 4.2-4.4).

Pure functions and small classes, each tested against an independent computation:

- :mod:`~batchnorm.lab.theory.gradient_explosion` -- Yang et al. 2019: the closed-form
  per-layer gradient growth lambda(B) at initialization, and its Monte Carlo estimate.
- :mod:`~batchnorm.lab.theory.covariate_shift` -- Santurkar et al. 2018, Definition 2.1:
  internal covariate shift as ``||G - G'||`` and ``cos(G, G')`` per layer.
- :mod:`~batchnorm.lab.theory.landscape` -- Santurkar et al. Sec. 3.1: loss, gradient change and
  effective beta-smoothness along the gradient.
- :mod:`~batchnorm.lab.theory.noisy_bn` -- the paper's "noisy BatchNorm" noise injection.
- :mod:`~batchnorm.lab.theory.deep_linear` -- the 25-layer deep linear network problem.
- :mod:`~batchnorm.lab.theory.decoupling` -- Kohler et al. 2019: length-direction decoupling,
  GDNP on least squares, halfspaces and a tanh MLP.
- :mod:`~batchnorm.lab.theory.single_layer` -- Santurkar et al. Theorems 4.1 and 4.2 on one BN
  layer.

Submodules are imported on use (``from batchnorm.lab.theory import decoupling``); importing this
package loads none of them.
"""
