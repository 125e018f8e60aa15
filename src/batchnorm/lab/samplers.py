"""The lab's one family of mini-batch samplers.

Every training loop of the lab draws its mini-batches from here, so that the orders are defined
once and each experiment's order is reproducible from its seed alone:

- :func:`batch_indices` / :class:`EpochBatches`: the order of the MLP jobs
  (:mod:`batchnorm.lab.train`): epoch e of seed s visits the training set in the order
  ``numpy.random.default_rng([s, e]).permutation(N)``, so a resumed job sees exactly the batches
  it would have seen, computed from (seed, step) alone;
- :func:`iid_batches`: an endless sampler of i.i.d. batches (a fresh permutation per epoch, the
  last partial batch dropped) for the CNN and recurrent experiments; :func:`batch_order` takes
  its first batches as an array;
- :class:`TorchEpochs`: i.i.d. batches from torch's generator (a fresh ``torch.randperm`` when
  the current one runs out), with a state a checkpoint can save (``explosion``);
- :func:`few_class_batches`: non-i.i.d. batches, each drawn from a few classes (``non-iid``);
- :func:`popstat_batches`: the fixed batches on which Algorithm 2 recomputes the population
  statistics at an evaluation step of an MLP job; :func:`recalibration_batches`: those of a CNN
  (one fixed shuffle of the training set per seed, the same at every point of training:
  ``precise-bn``, ``adapt``).

(The samplers keep the exact random streams they had in the modules they came from, so no
experiment's numbers move.)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "EpochBatches",
    "TorchEpochs",
    "batch_indices",
    "batch_order",
    "few_class_batches",
    "iid_batches",
    "popstat_batches",
    "recalibration_batches",
]


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """The training examples of one network's mini-batch at ``step`` (see the module doc).

    >>> a = batch_indices(0, 0, 100, 10)
    >>> b = batch_indices(0, 9, 100, 10)   # the last batch of epoch 0
    >>> len(set(a) | set(b)), len(a)
    (20, 10)
    """
    per_epoch = num_examples // batch_size
    if per_epoch < 1:
        raise ValueError(
            f"the training set ({num_examples} examples) is smaller than one batch "
            f"({batch_size}); use a smaller batch_size or a larger training subset"
        )
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[position * batch_size : (position + 1) * batch_size]


class EpochBatches:
    """Mini-batch indices for all networks of a wide job at once (:func:`batch_indices` for each
    seed), caching each seed's permutation for the epoch."""

    def __init__(self, seeds: Sequence[int], num_examples: int, batch_size: int) -> None:
        self.seeds = list(seeds)
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.per_epoch = num_examples // batch_size
        if self.per_epoch < 1:
            batch_indices(0, 0, num_examples, batch_size)  # raises the explanatory error
        self._epoch = -1
        self._orders: dict[int, np.ndarray] = {}

    def __call__(self, step: int) -> np.ndarray:
        """(G, B) example indices, one row per network."""
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._orders = {
                s: np.random.default_rng([s, epoch]).permutation(self.num_examples)
                for s in set(self.seeds)
            }
            self._epoch = epoch
        lo, hi = position * self.batch_size, (position + 1) * self.batch_size
        return np.stack([self._orders[s][lo:hi] for s in self.seeds])


def popstat_batches(step: int, count: int, num_examples: int, batch_size: int) -> list[np.ndarray]:
    """``count`` mini-batches of training indices for Algorithm 2, fixed by the step."""
    rng = np.random.default_rng([0xB4, step])
    per_epoch = num_examples // batch_size
    batches: list[np.ndarray] = []
    while len(batches) < count:
        order = rng.permutation(num_examples)
        for i in range(min(per_epoch, count - len(batches))):
            batches.append(order[i * batch_size : (i + 1) * batch_size])
    return batches


# Keeps the recalibration shuffle apart from the training batches' stream of the same seed.
RECALIBRATION_SEED_OFFSET = 10_000


def recalibration_batches(
    n: int, batch_size: int, seed: int, count: int | None = None
) -> list[torch.Tensor]:
    """Algorithm 2's batches for the network trained with ``seed``: one fixed shuffle of the
    ``n`` training examples, cut into full batches of indices; the first ``count`` (all when
    None).

    >>> [b.tolist() for b in recalibration_batches(5, 2, seed=0)]
    [[2, 1], [3, 0]]
    """
    order = np.random.default_rng(RECALIBRATION_SEED_OFFSET + seed).permutation(n)
    batches = list(torch.from_numpy(order[: (n // batch_size) * batch_size]).split(batch_size))
    return batches if count is None else batches[:count]


def iid_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless mini-batch indices: a fresh permutation each epoch, the last partial batch
    dropped."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """The first ``steps`` batches of :func:`iid_batches`, as a (steps, batch_size) array."""
    return np.stack(list(itertools.islice(iid_batches(n, batch_size, seed), steps)))


def few_class_batches(
    labels: np.ndarray, batch_size: int, classes_per_batch: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless non-i.i.d. mini-batches: each draws ``classes_per_batch`` classes at random, then
    ``batch_size`` examples from those classes only (equal shares, without replacement within a
    batch)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if not 1 <= classes_per_batch <= len(classes):
        raise ValueError(
            f"classes_per_batch must lie in 1..{len(classes)} (the classes present), "
            f"got {classes_per_batch}"
        )
    by_class = {int(c): np.nonzero(labels == c)[0] for c in classes}
    while True:
        chosen = rng.choice(classes, size=classes_per_batch, replace=False)
        shares = np.full(classes_per_batch, batch_size // classes_per_batch)
        shares[: batch_size - shares.sum()] += 1
        parts = [
            rng.choice(by_class[int(c)], size=min(int(s), len(by_class[int(c)])), replace=False)
            for c, s in zip(chosen, shares, strict=True)
        ]
        yield rng.permutation(np.concatenate(parts))


class TorchEpochs:
    """Endless mini-batches of ``batch_size`` of ``n`` examples from ``torch.randperm`` with its
    own generator seeded by ``seed``: a permutation is used up batch by batch, and a fresh one
    drawn when fewer than ``batch_size`` examples are left. After the batches, ``generator``
    goes on drawing (e.g. Algorithm 2's batches) from where the sampler left it.

    >>> sampler = TorchEpochs(10, 4, seed=0)
    >>> [len(sampler.next()) for _ in range(3)]
    [4, 4, 4]
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must lie in 1..{n} (the examples), got {batch_size}")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        """The next mini-batch's indices (int64)."""
        if self.position + self.batch_size > self.n:
            self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], int(state["position"])
