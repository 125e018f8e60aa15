"""The worked example of docs/doctor.md: a small CNN with the usual batch-norm trouble.

Run it as ``python docs/doctor_example.py OUT_DIR``: it trains the network on a synthetic
4-class image task, the way that goes wrong in practice (a momentum copied from Keras, training
stopped at a high learning rate, a layer "frozen" with requires_grad=False), and saves
``OUT_DIR/model.pt`` (the whole model), ``OUT_DIR/train.pt`` and ``OUT_DIR/test.pt``
(``(inputs, labels)``) for ``batchnorm doctor``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, 8, 8) whose class depends on two colour/region averages."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5])
    y = ((x.mean((2, 3)) @ w) > 0).long() + 2 * (x[:, 0, :4].mean((1, 2)) > 0).long()
    return x * 2 + 1, y


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16, momentum=0.99),  # Keras' momentum=0.99, pasted into PyTorch
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model = build()
    x, y = make_data(4096, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    generator = torch.Generator().manual_seed(1)
    for epoch in range(3):  # no learning-rate decay: the weights still move at the end
        if epoch == 2:  # "freeze" the first batch norm for fine-tuning, but only its parameters
            model[1].weight.requires_grad_(False)
            model[1].bias.requires_grad_(False)
        permutation = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = permutation[start : start + 64]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    torch.save(model, out / "model.pt")
    torch.save(make_data(4096, 1), out / "train.pt")  # more training data, same distribution
    torch.save(make_data(1024, 2), out / "test.pt")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "doctor-example")
