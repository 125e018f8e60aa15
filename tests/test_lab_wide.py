"""The wide network is exactly G separate networks: forward, backward, training, BN choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.lab.data import load_dataset
from batchnorm.lab.train import TrainSettings, train
from batchnorm.lab.wide import NetSpec, WideMLP
from tests.helpers import assert_close, tolerance

SPECS = [
    NetSpec("plain tanh", seed=3, activation="tanh", init_scale=0.5),
    NetSpec("bn sigmoid", seed=1, batch_norm=True),
    NetSpec("plain sigmoid", seed=1),
    NetSpec("bn relu", seed=2, batch_norm=True, activation="relu", init_scale=2.0),
]
ACT = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids waiting on busy cores of a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def separate_network(model: WideMLP, g: int) -> nn.Sequential:
    """Network g of the wide model as an ordinary torch model with copies of its parameters."""
    spec = model.specs[g]
    layers: list[nn.Module] = []
    widths = (model.in_features, *model.hidden)
    with torch.no_grad():
        for layer, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(fan_in, fan_out, bias=not spec.batch_norm, dtype=torch.float64)
            linear.weight.copy_(model.weights[layer][g].T)
            layers.append(linear)
            if spec.batch_norm:
                bn = nn.BatchNorm1d(fan_out, dtype=torch.float64)
                cols = slice(g * fan_out, (g + 1) * fan_out)
                bn.weight.copy_(model.norms[layer].weight[cols])
                bn.bias.copy_(model.norms[layer].bias[cols])
                bn.running_mean.copy_(model.norms[layer].running_mean[cols])
                bn.running_var.copy_(model.norms[layer].running_var[cols])
                layers.append(bn)
            else:
                linear.bias.copy_(model.hidden_biases[layer][g - model.num_bn, 0])
            layers.append(ACT[spec.activation]())
        out = nn.Linear(model.hidden[-1], model.num_classes, dtype=torch.float64)
        out.weight.copy_(model.weights[-1][g].T)
        out.bias.copy_(model.output_bias[g, 0])
        layers.append(out)
    return nn.Sequential(*layers)


def make_model() -> WideMLP:
    model = WideMLP(SPECS, in_features=7, hidden=(6, 5), num_classes=4).double()
    with torch.no_grad():  # non-trivial gamma, beta and biases
        for p in model.parameters():
            if p.dim() < 3 or p.shape[1] == 1:
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    return model


def test_internal_order_groups_batch_norm_then_nonlinearity() -> None:
    model = WideMLP(SPECS, 7, (6,), 4)
    assert [s.variant for s in model.specs] == [
        "bn sigmoid",
        "bn relu",
        "plain sigmoid",
        "plain tanh",
    ]
    assert model.activation_runs == [
        (0, 1, "sigmoid"),
        (1, 2, "relu"),
        (2, 3, "sigmoid"),
        (3, 4, "tanh"),
    ]


@pytest.mark.parametrize("training", [True, False])
def test_forward_and_backward_equal_separate_networks(training: bool) -> None:
    torch.manual_seed(0)
    model = make_model()
    model.train(training)
    x = torch.randn(len(SPECS), 9, 7, dtype=torch.float64)  # one batch per network
    y = torch.randint(0, 4, (len(SPECS), 9))
    logits = model(x)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 4), y.reshape(-1), reduction="none")
    loss.view(len(SPECS), 9).mean(1).sum().backward()
    rtol, atol = tolerance("float64", "forward")
    grtol, gatol = tolerance("float64", "gradient")
    for g in range(len(SPECS)):
        ref = separate_network(model, g)
        ref.train(training)
        ref_logits = ref(x[g])
        assert_close(logits[g], ref_logits, rtol=rtol, atol=atol, name=f"logits of net {g}")
        nn.functional.cross_entropy(ref_logits, y[g]).backward()
        linears = [m for m in ref if isinstance(m, nn.Linear)]
        for layer, linear in enumerate(linears):
            assert_close(
                model.weights[layer].grad[g],
                linear.weight.grad.T,
                rtol=grtol,
                atol=gatol,
                name=f"dW{layer} of net {g}",
            )
        norms = [m for m in ref if isinstance(m, nn.BatchNorm1d)]
        for layer, bn in enumerate(norms):
            cols = slice(g * bn.num_features, (g + 1) * bn.num_features)
            assert_close(
                model.norms[layer].weight.grad[cols],
                bn.weight.grad,
                rtol=grtol,
                atol=gatol,
                name=f"dgamma{layer} of net {g}",
            )
            assert_close(
                model.norms[layer].bias.grad[cols],
                bn.bias.grad,
                rtol=grtol,
                atol=gatol,
                name=f"dbeta{layer} of net {g}",
            )


def test_shared_input_equals_repeated_input() -> None:
    model = make_model().eval()
    x = torch.randn(5, 7, dtype=torch.float64)
    rtol, atol = tolerance("float64", "forward")
    assert_close(
        model(x),
        model(x.expand(len(SPECS), 5, 7).contiguous()),
        rtol=rtol,
        atol=atol,
        name="shared vs repeated input",
    )


def test_same_seed_same_initial_weights() -> None:
    model = WideMLP(SPECS, 7, (6, 5), 4)
    a, b = model.specs.index(SPECS[1]), model.specs.index(SPECS[2])  # both seed 1, scale 1
    for w in model.weights:
        assert torch.equal(w[a], w[b])
    c = model.specs.index(SPECS[0])  # seed 3
    assert not torch.equal(model.weights[0][a], model.weights[0][c])
    # N(0, s^2 / fan_in): the scale multiplies the same draw.
    d = model.specs.index(SPECS[3])
    scaled = WideMLP([NetSpec("x", seed=2)], 7, (6, 5), 4)
    assert torch.allclose(model.weights[0][d], 2.0 * scaled.weights[0][0])


def test_dropout_only_touches_its_own_network() -> None:
    specs = [NetSpec("p", seed=0, dropout=0.5), NetSpec("q", seed=0)]
    model = WideMLP(specs, 7, (50,), 3)
    x = torch.randn(8, 7)
    model.train()
    a, b = model(x), model(x)
    assert torch.equal(a[1], b[1])  # no dropout: deterministic, and not affected by net 0
    assert not torch.equal(a[0], b[0])  # dropout: a fresh mask each call
    model.eval()
    assert torch.equal(model(x)[0], model(x)[1])  # eval: no dropout, same weights


def test_dropout_masks_follow_the_seeds_not_torchs_global_generator() -> None:
    specs = [NetSpec("p", seed=0, dropout=0.5), NetSpec("q", seed=1, dropout=0.3)]
    x = torch.randn(8, 7)
    outputs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # must not matter
        model = WideMLP(specs, 7, (50,), 3).train()
        outputs.append((model(x), model(x)))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert not torch.equal(outputs[0][0], outputs[0][1])  # a fresh mask each call


def test_training_together_equals_training_alone() -> None:
    data = load_dataset("synthetic").subset(600, 200)
    settings = TrainSettings(
        steps=40, batch_size=20, eval_steps=(0, 40), popstat_batches=5, final_popstat_batches=10
    )
    specs = [
        NetSpec("bn", 0, batch_norm=True, lr=0.2),
        NetSpec("plain", 1, lr=0.5),
        NetSpec("bn relu", 2, batch_norm=True, activation="relu", lr=0.05),
    ]
    together = train(WideMLP(specs, 64, (16, 16), 10), data, settings)
    rtol, atol = tolerance("float32", "gradient")
    for spec in specs:
        alone = train(WideMLP([spec], 64, (16, 16), 10), data, settings)
        g = together.specs.index(spec)
        assert_close(
            together.test_loss[:, g],
            alone.test_loss[:, 0],
            rtol=rtol,
            atol=atol,
            name=f"test loss of {spec.variant}",
        )
        assert_close(
            together.train_loss[1:, g],
            alone.train_loss[1:, 0],
            rtol=rtol,
            atol=atol,
            name=f"train loss of {spec.variant}",
        )


def test_project_layer_and_torch_layer_train_identically() -> None:
    data = load_dataset("synthetic").subset(400, 100)
    settings = TrainSettings(
        steps=30, batch_size=20, eval_steps=(0, 30), popstat_batches=4, final_popstat_batches=8
    )
    specs = [NetSpec("bn", s, batch_norm=True) for s in range(2)]
    ours = WideMLP(specs, 64, (12,), 10, bn_impl="batchnorm")
    theirs = WideMLP(specs, 64, (12,), 10, bn_impl="torch")
    assert type(ours.norms[0]).__module__ == "batchnorm.nn.batchnorm"
    assert type(theirs.norms[0]) is nn.BatchNorm1d
    a, b = train(ours, data, settings), train(theirs, data, settings)
    np.testing.assert_allclose(a.test_loss, b.test_loss, rtol=1e-5, atol=1e-6)


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="activation 'swish' is not one of"):
        NetSpec("x", 0, activation="swish")
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        NetSpec("x", 0, dropout=1.0)
    with pytest.raises(ValueError, match="at least one NetSpec"):
        WideMLP([], 4, (3,), 2)
    with pytest.raises(ValueError, match="bn_impl"):
        WideMLP([NetSpec("x", 0)], 4, (3,), 2, bn_impl="cudnn")
    model = WideMLP([NetSpec("x", 0), NetSpec("y", 1)], 4, (3,), 2)
    with pytest.raises(ValueError, match=r"expects a \(B, 4\) input .* got \(3, 5, 4\)"):
        model(torch.randn(3, 5, 4))
