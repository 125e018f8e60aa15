"""The grouped CNN is exactly K separate conv_net networks: forward, backward, SGD steps, running
statistics, every norm the CNN experiments use, AGC per network (float64)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.lab.experiments.cnn import (
    ImageData,
    conv_net,
    evaluate,
    iid_batches,
    train_net,
)
from batchnorm.lab.grouped import (
    ConvNetSpec,
    GroupedAGC,
    GroupedConvNet,
    clip_grad_per_network_,
    evaluate_grouped,
    grouped_cross_entropy,
    train_grouped,
)
from batchnorm.lab.loop import StepDecay
from batchnorm.optim import AGC
from tests.helpers import assert_close, tolerance

CHANNELS = (4, 6)
CLASSES = 3
BATCH = 10
IMAGE = 11  # odd: the ceil-mode pooling keeps a partial window

# Every norm of conv_net, with the options the experiments give it; a renorm schedule short
# enough that r and d are clipped within the steps of a test.
NORM_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "bn": ("bn", {}),
    "bn momentum 0.3": ("bn", {"momentum": 0.3}),
    "gn": ("gn", {"num_groups": 2}),
    "ln": ("ln", {}),
    "in": ("in", {}),
    "ghost 4 (batch 10: 4, 4, 2)": ("ghost", {"virtual_batch_size": 4}),
    "renorm": ("renorm", {"warmup_steps": 1, "d_max_reached_at": 2, "r_max_reached_at": 3}),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids waiting on busy cores of a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(specs: list[ConvNetSpec], head: str = "gap") -> tuple[GroupedConvNet, list[nn.Module]]:
    """The grouped network and K separate conv_net networks with the same (perturbed) weights."""
    singles = []
    shape = (IMAGE, IMAGE)
    for k, spec in enumerate(specs):
        net = conv_net(
            spec.norm,
            CHANNELS,
            CLASSES,
            spec.seed,
            head=head,
            image_shape=shape,
            **spec.norm_kwargs,
        ).double()
        generator = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():  # gamma != 1 and beta != 0, different per network
            for module in net.modules():
                if not isinstance(module, (nn.Conv2d, nn.Linear)):
                    for p in module.parameters(recurse=False):
                        p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        singles.append(net)
    grouped = GroupedConvNet(specs, CHANNELS, CLASSES, head=head, image_shape=shape).double()
    for k, net in enumerate(singles):
        grouped.load_network(k, net)
    return grouped, singles


def assert_networks_equal(
    grouped: GroupedConvNet, singles: list[nn.Module], *, grads: bool, what: str
) -> None:
    kind = "gradient" if grads else "forward"
    rtol, atol = tolerance("float64", kind)
    for k, net in enumerate(singles):
        views = grouped.network_tensors(k, grads=grads)
        if grads:
            expected = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        else:
            expected = net.state_dict()
        assert set(views) == set(expected), f"net {k}: {sorted(views)} vs {sorted(expected)}"
        for key, value in expected.items():
            assert_close(views[key], value, rtol=rtol, atol=atol, name=f"{what} {key} of net {k}")


def train_both(
    grouped: GroupedConvNet,
    singles: list[nn.Module],
    steps: int,
    *,
    shared_input: bool,
    agc: float | None = None,
    check_each_step: bool = True,
) -> None:
    """SGD with momentum and weight decay: one optimizer on the grouped network, one per
    separate network; compares logits, gradients and all tensors after every step."""
    K = len(singles)
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    opt = torch.optim.SGD(grouped.parameters(), **options)
    opts = [torch.optim.SGD(net.parameters(), **options) for net in singles]
    if agc is not None:
        GroupedAGC(opt, grouped, clipping=agc)
        for net, o in zip(singles, opts):
            AGC(o, clipping=agc, exclude=[net[-1]])
    generator = torch.Generator().manual_seed(7)
    rtol, atol = tolerance("float64", "forward")
    for step in range(steps):
        shape = (BATCH, 1, IMAGE, IMAGE) if shared_input else (K, BATCH, 1, IMAGE, IMAGE)
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        y = torch.randint(0, CLASSES, shape[:-3], generator=generator)
        logits = grouped(x)
        opt.zero_grad()
        grouped_cross_entropy(logits, y).backward()
        for k, (net, o) in enumerate(zip(singles, opts)):
            xk, yk = (x, y) if shared_input else (x[k], y[k])
            single_logits = net(xk)
            assert_close(
                logits[k], single_logits, rtol=rtol, atol=atol, name=f"step {step} logits of {k}"
            )
            o.zero_grad()
            F.cross_entropy(single_logits, yk).backward()
        if check_each_step:
            assert_networks_equal(grouped, singles, grads=True, what=f"step {step} grad")
        opt.step()
        for o in opts:
            o.step()
        assert_networks_equal(grouped, singles, grads=False, what=f"after step {step}")


@pytest.mark.parametrize("case", list(NORM_CASES))
@pytest.mark.parametrize("shared_input", [True, False], ids=["shared batch", "batch per net"])
def test_training_steps_equal_separate_networks(case: str, shared_input: bool) -> None:
    norm, kwargs = NORM_CASES[case]
    specs = [ConvNetSpec(case, seed=s, norm=norm, norm_kwargs=kwargs) for s in (0, 1, 2)]
    grouped, singles = build(specs)
    assert_networks_equal(grouped, singles, grads=False, what="initial")
    train_both(grouped, singles, steps=4, shared_input=shared_input)
    # Inference (population statistics where the norm keeps them) agrees too.
    grouped.eval()
    x = torch.randn(BATCH, 1, IMAGE, IMAGE, dtype=torch.float64)
    rtol, atol = tolerance("float64", "forward")
    for k, net in enumerate(singles):
        net.eval()
        assert_close(grouped(x)[k], net(x), rtol=rtol, atol=atol, name=f"eval logits of {k}")


def test_flatten_head_reads_the_whole_last_feature_map() -> None:
    """conv_net's ``flatten`` head: one linear layer on C x H x W features (ceil-mode pooling:
    11 -> 6 -> 3), the same convolutions as the ``gap`` head from the same seed."""
    gap = conv_net("bn", CHANNELS, CLASSES, 0)
    flat = conv_net("bn", CHANNELS, CLASSES, 0, head="flatten", image_shape=(IMAGE, IMAGE))
    assert flat[-1].in_features == CHANNELS[-1] * 3 * 3 and gap[-1].in_features == CHANNELS[-1]
    assert torch.equal(flat[0].weight, gap[0].weight)
    x = torch.randn(BATCH, 1, IMAGE, IMAGE)
    assert flat(x).shape == (BATCH, CLASSES)
    grouped = GroupedConvNet(
        [ConvNetSpec("bn", 0), ConvNetSpec("bn", 1)],
        CHANNELS,
        CLASSES,
        head="flatten",
        image_shape=(IMAGE, IMAGE),
    )
    assert grouped.blocks[0].classifier_weight.shape == (2 * CLASSES, CHANNELS[-1] * 9)
    assert grouped(x).shape == (2, BATCH, CLASSES)
    with pytest.raises(ValueError, match="needs the images"):
        conv_net("bn", CHANNELS, CLASSES, 0, head="flatten")
    with pytest.raises(ValueError, match="unknown head"):
        conv_net("bn", CHANNELS, CLASSES, 0, head="max")


@pytest.mark.parametrize("case", ["none", "bn", "gn", "ghost 4 (batch 10: 4, 4, 2)"])
@pytest.mark.parametrize("shared_input", [True, False], ids=["shared batch", "batch per net"])
def test_flatten_head_steps_equal_separate_networks(case: str, shared_input: bool) -> None:
    """With the flatten head too, the grouped network trains as K separate ones (channels-last
    activations included: the flattening follows conv_net's (C, H, W) order)."""
    norm, kwargs = NORM_CASES[case]
    specs = [ConvNetSpec(case, seed=s, norm=norm, norm_kwargs=kwargs) for s in (0, 1)]
    specs.append(ConvNetSpec("bn", seed=2))  # a second run of the same head
    grouped, singles = build(specs, head="flatten")
    assert_networks_equal(grouped, singles, grads=False, what="initial")
    grouped.to(memory_format=torch.channels_last)
    train_both(grouped, singles, steps=3, shared_input=shared_input, agc=0.05)
    copy_0 = grouped.network(0)
    assert copy_0.state_dict().keys() == singles[0].state_dict().keys()


def test_running_statistics_moved_and_match() -> None:
    """The comparison above includes running statistics; here they must also have moved away
    from their initial values (so the comparison is not between two untouched buffers)."""
    specs = [ConvNetSpec("bn", seed=s) for s in (0, 1)]
    grouped, singles = build(specs)
    train_both(grouped, singles, steps=2, shared_input=False)
    rtol, atol = tolerance("float64", "forward")
    for k, net in enumerate(singles):
        views = grouped.network_tensors(k)
        for key, value in net.state_dict().items():
            if key.endswith("running_mean"):
                assert value.abs().min() > 1e-8, key  # moved from 0 in every channel
            if key.endswith("running_var"):
                assert (value - 1).abs().min() > 1e-4, key  # moved from 1 in every channel
            if key.endswith("num_batches_tracked"):
                assert int(views[key]) == 2 == int(value)
            assert_close(views[key], value, rtol=rtol, atol=atol, name=f"{key} of net {k}")


def test_every_norm_in_one_network() -> None:
    """Networks with different norms in one grouped network: each run of one norm has its own
    layer, and every network still trains exactly as on its own."""
    specs = [
        ConvNetSpec(name, seed=seed, norm=norm, norm_kwargs=kwargs)
        for name, (norm, kwargs) in NORM_CASES.items()
        for seed in (0, 1)
    ]
    grouped, singles = build(specs)
    assert len(grouped.runs) == len(NORM_CASES)
    train_both(grouped, singles, steps=3, shared_input=True, check_each_step=True)


def test_same_seed_same_weights_as_conv_net_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    specs = [ConvNetSpec("a", seed=5), ConvNetSpec("b", seed=6, norm="none")]
    grouped = GroupedConvNet(specs, CHANNELS, CLASSES)
    assert torch.equal(torch.get_rng_state(), before)
    for k, spec in enumerate(specs):
        expected = conv_net(spec.norm, CHANNELS, CLASSES, spec.seed).state_dict()
        views = grouped.network_tensors(k)
        for key, value in expected.items():
            assert torch.equal(views[key], value), f"{key} of net {k}"
    # Conv weights of seed 5 and seed 6 differ (the init really comes from each seed).
    assert not torch.equal(
        grouped.network_tensors(0)["0.weight"], grouped.network_tensors(1)["0.weight"]
    )


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_agc_clips_each_network_as_on_its_own(norm: str) -> None:
    specs = [ConvNetSpec(norm, seed=s, norm=norm) for s in (0, 1, 2)]
    grouped, singles = build(specs)
    # The clipping is active: a unit-wise clip of the first gradients changes them (on a copy,
    # whose forward pass moves running statistics the separate networks do not see).
    probe = copy.deepcopy(grouped)
    x = torch.randn(BATCH, 1, IMAGE, IMAGE, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (BATCH,))
    grouped_cross_entropy(probe(x), y).backward()
    before = {name: p.grad.clone() for name, p in probe.named_parameters()}
    clip_grad_per_network_(probe, clipping=0.01)
    changed = {
        name for name, p in probe.named_parameters() if not torch.equal(before[name], p.grad)
    }
    classifier = {n for n, p in probe.named_parameters() if "classifier" in n}
    assert len(classifier) == 2 and changed and not changed & classifier
    train_both(grouped, singles, steps=3, shared_input=False, agc=0.01)


def test_vectors_are_clipped_per_network_not_across_networks() -> None:
    """A bias vector is one unit per network: scaling network 1's gradient must not change how
    network 0's is clipped."""
    specs = [ConvNetSpec("none", seed=s, norm="none") for s in (0, 1)]
    grouped, _ = build(specs)
    bias = grouped.blocks[0].convs[0].bias
    results = []
    for scale in (1.0, 1000.0):
        grouped.zero_grad()
        for p in grouped.parameters():
            p.grad = torch.full_like(p, 0.01)
        bias.grad[CHANNELS[0] :] *= scale  # network 1's slice
        clip_grad_per_network_(grouped, clipping=0.5)
        results.append(bias.grad[: CHANNELS[0]].clone())
    assert torch.equal(results[0], results[1])


def test_channels_last_equals_contiguous() -> None:
    specs = [
        ConvNetSpec("bn", seed=0),
        ConvNetSpec("gn", seed=1, norm="gn", norm_kwargs={"num_groups": 2}),
    ]
    grouped, _ = build(specs)
    x = torch.randn(BATCH, 1, IMAGE, IMAGE, dtype=torch.float64)
    reference = grouped(x)
    grouped = grouped.to(memory_format=torch.channels_last)
    rtol, atol = tolerance("float64", "forward")
    assert_close(
        grouped(x.to(memory_format=torch.channels_last)),
        reference,
        rtol=rtol,
        atol=atol,
        name="channels-last logits",
    )


def test_evaluate_grouped_equals_evaluate() -> None:
    specs = [ConvNetSpec("bn", seed=s) for s in (0, 1)]
    grouped, singles = build(specs)
    train_both(grouped, singles, steps=2, shared_input=False, check_each_step=False)
    x = torch.randn(25, 1, IMAGE, IMAGE, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (25,))
    accs, losses = evaluate_grouped(grouped, x, y, chunk=10)
    for k, net in enumerate(singles):
        acc, loss = evaluate(net, x, y, chunk=10)
        assert accs[k] == acc
        assert abs(losses[k] - loss) < 1e-10
    assert grouped.training  # left in the mode it was in


def test_per_network_losses_sum_to_the_loss() -> None:
    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 5))
    per_network = grouped_cross_entropy(logits, y, per_network=True)
    for k in range(3):
        assert abs(float(per_network[k]) - float(F.cross_entropy(logits[k], y[k]))) < 1e-12
    assert abs(float(grouped_cross_entropy(logits, y)) - float(per_network.sum())) < 1e-12


def test_bad_input_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="unknown norm 'bnn'"):
        ConvNetSpec("x", seed=0, norm="bnn")
    with pytest.raises(ValueError, match="at least one"):
        GroupedConvNet([], CHANNELS, CLASSES)
    with pytest.raises(ValueError, match="num_groups=4"):
        GroupedConvNet([ConvNetSpec("g", 0, "gn", {"num_groups": 4})], (6,), CLASSES)
    model = GroupedConvNet([ConvNetSpec("a", 0), ConvNetSpec("b", 1)], CHANNELS, CLASSES)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(3, 2, 3, 8, 8))
    with pytest.raises(ValueError, match="build it with conv_net"):
        model.load_network(0, conv_net("none", CHANNELS, CLASSES, 0))
    with pytest.raises(IndexError, match="holds 2"):
        model.network_tensors(2)


def tiny_images(n_train: int = 60, n_test: int = 30) -> ImageData:
    generator = torch.Generator().manual_seed(3)
    return ImageData(
        name="tiny",
        train_x=torch.rand(n_train, 1, IMAGE, IMAGE, generator=generator, dtype=torch.float64),
        train_y=torch.randint(0, CLASSES, (n_train,), generator=generator),
        test_x=torch.rand(n_test, 1, IMAGE, IMAGE, generator=generator, dtype=torch.float64),
        test_y=torch.randint(0, CLASSES, (n_test,), generator=generator),
        image_shape=(IMAGE, IMAGE),
        num_classes=CLASSES,
        description="random images",
    )


def assert_results_equal(grouped: dict, single: dict, name: str) -> None:
    assert grouped.keys() == single.keys()
    assert grouped["steps"] == single["steps"], name
    assert grouped["diverged_at"] == single["diverged_at"], name
    for key in ("test_acc", "test_loss", "train_loss", "train_acc_final"):
        a = np.asarray(grouped[key], dtype=np.float64)
        e = np.asarray(single[key], dtype=np.float64)
        assert_close(a, e, rtol=1e-9, atol=1e-12, name=f"{name} {key}")


@pytest.mark.parametrize(
    ("agc", "channels_last"),
    [(False, False), (True, False), (False, True)],
    ids=["sgd", "agc on networks 0 and 2", "sgd channels-last"],
)
def test_train_grouped_equals_train_net(agc: bool, channels_last: bool) -> None:
    """Each network's result equals train_net's alone, network 1 diverging within its first
    steps (weights scaled to overflow) without disturbing the others."""
    data = tiny_images()
    specs = [
        ConvNetSpec("none", seed=0, norm="none"),
        ConvNetSpec("none", seed=1, norm="none"),
        ConvNetSpec("bn", seed=0),
        ConvNetSpec("gn", seed=1, norm="gn", norm_kwargs={"num_groups": 2}),
    ]
    grouped, singles = build(specs)
    with torch.no_grad():
        singles[1][0].weight.mul_(1e300)  # conv outputs overflow: a non-finite loss at step 1
    grouped.load_network(1, singles[1])
    clipped = [True, False, True, False] if agc else None
    options = {"steps": 9, "lr": 0.05, "momentum": 0.9, "evals": 3, "desc": "test"}
    results = train_grouped(
        grouped,
        data,
        [iid_batches(len(data.train_y), 8, seed=10 + k) for k in range(len(specs))],
        agc_clipping=0.01 if agc else None,
        clipped=clipped,
        channels_last=channels_last,
        **options,
    )
    weight = grouped.blocks[0].convs[1].weight  # (n * 6, 4, 3, 3): the format is visible
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    for k, net in enumerate(singles):
        clip = 0.01 if agc and clipped[k] else None
        single = train_net(
            net, data, iid_batches(len(data.train_y), 8, seed=10 + k), agc_clipping=clip, **options
        )
        assert_results_equal(results[k], single, f"net {k}")
        # Also the diverged network's: frozen where train_net stopped it.
        views = grouped.network_tensors(k)
        for key, value in net.state_dict().items():
            assert_close(views[key], value, rtol=1e-9, atol=1e-12, name=f"{key} of net {k}")
    assert 1 <= results[1]["diverged_at"] <= 3  # before the first evaluation
    assert results[1]["test_acc"] == [1 / CLASSES] * 3
    assert all(r["diverged_at"] == -1 for k, r in enumerate(results) if k != 1)


def test_network_copy_is_the_separate_network() -> None:
    specs = [ConvNetSpec("gn", 0, "gn", {"num_groups": 2}), ConvNetSpec("ghost", 1, "ghost")]
    grouped, singles = build(specs)
    train_both(grouped, singles, steps=2, shared_input=False, check_each_step=False)
    x = torch.randn(BATCH, 1, IMAGE, IMAGE, dtype=torch.float64)
    for k, net in enumerate(singles):
        copy_k = grouped.network(k)
        assert copy_k.training and next(copy_k.parameters()).dtype == torch.float64
        views = grouped.network_tensors(k)
        assert copy_k.state_dict().keys() == net.state_dict().keys()
        for key, value in copy_k.state_dict().items():
            assert torch.equal(value, views[key]), key
        rtol, atol = tolerance("float64", "forward")
        assert_close(copy_k.eval()(x), net.eval()(x), rtol=rtol, atol=atol, name=f"net {k}")


def test_an_interrupted_group_continues_where_it_stopped(tmp_path) -> None:
    """A group interrupted after a checkpoint resumes from it (draws and drops the batches it
    trained on) and ends with exactly the results and weights of an uninterrupted group,
    including a network that diverged before the interruption."""
    data = tiny_images()
    specs = [
        ConvNetSpec("bn", seed=0),
        ConvNetSpec("none", seed=1, norm="none"),
        ConvNetSpec("gn", seed=2, norm="gn", norm_kwargs={"num_groups": 2}),
    ]
    options = {"steps": 12, "lr": 0.05, "momentum": 0.9, "evals": 4, "desc": "test"}

    def samplers() -> list:
        return [iid_batches(len(data.train_y), 8, seed=20 + k) for k in range(len(specs))]

    def fresh() -> GroupedConvNet:
        model, singles = build(specs)
        with torch.no_grad():
            singles[1][0].weight.mul_(1e300)  # diverges at once
        model.load_network(1, singles[1])
        return model

    whole = fresh()
    expected = train_grouped(whole, data, samplers(), **options)

    calls = {"n": 0}

    def evaluate_then_stop(model: GroupedConvNet) -> tuple[list[float], list[float]]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # after the checkpoints of evaluations 1 and 2
        return evaluate_grouped(model, data.test_x, data.test_y)

    checkpoint = tmp_path / "group.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_grouped(
            fresh(),
            data,
            samplers(),
            eval_fn=evaluate_then_stop,
            checkpoint=checkpoint,
            checkpoint_seconds=0.0,
            **options,
        )
    assert checkpoint.is_file()
    resumed_model = fresh()
    resumed = train_grouped(
        resumed_model, data, samplers(), checkpoint=checkpoint, checkpoint_seconds=0.0, **options
    )
    for k in range(len(specs)):
        assert_results_equal(resumed[k], expected[k], f"net {k}")
        for key, value in whole.network_tensors(k).items():
            assert torch.equal(resumed_model.network_tensors(k)[key], value), (k, key)
    assert 1 <= resumed[1]["diverged_at"] == expected[1]["diverged_at"] <= 3  # before the stop
    other = GroupedConvNet([ConvNetSpec("bn", seed=5)] * 2, CHANNELS, CLASSES)
    with pytest.raises(ValueError, match="written for other networks"):
        train_grouped(other, data, samplers()[:2], checkpoint=checkpoint, **options)


@pytest.mark.parametrize("lr", [0.05, StepDecay(0.05, at=6, factor=0.1)], ids=["constant", "decay"])
def test_an_interrupted_network_continues_where_it_stopped(tmp_path, lr) -> None:
    """train_net (one network, with AGC, as the experiments train it alone) resumes from its
    checkpoint and ends with exactly the results and weights of an uninterrupted run; with a
    rate drop at step 6, interrupted at the evaluation of step 9 (after the drop)."""
    data = tiny_images()
    options = {"steps": 12, "lr": lr, "momentum": 0.9, "evals": 4, "desc": "test"}

    def fresh() -> nn.Module:
        return conv_net("bn", CHANNELS, CLASSES, 3).double()

    whole = fresh()
    expected = train_net(whole, data, iid_batches(60, 8, 7), agc_clipping=0.01, **options)
    calls = {"n": 0}

    def evaluate_then_stop(model: nn.Module) -> tuple[float, float]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return evaluate(model, data.test_x, data.test_y)

    checkpoint = tmp_path / "net.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_net(fresh(), data, iid_batches(60, 8, 7), agc_clipping=0.01,
                  eval_fn=evaluate_then_stop, checkpoint=checkpoint, checkpoint_seconds=0.0,
                  **options)  # fmt: skip
    assert checkpoint.is_file()
    resumed_model = fresh()
    resumed = train_net(resumed_model, data, iid_batches(60, 8, 7), agc_clipping=0.01,
                        checkpoint=checkpoint, checkpoint_seconds=0.0, **options)  # fmt: skip
    assert_results_equal(resumed, expected, "resumed")
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="written for other networks"):
        train_net(conv_net("none", CHANNELS, CLASSES, 3).double(), data, iid_batches(60, 8, 7),
                  checkpoint=checkpoint, **options)  # fmt: skip


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_train_jobs_drops_the_learning_rate_within_one_run(tmp_path, float64_default) -> None:
    """With decay_at, train_jobs trains each network in one run of the loop whose rate drops
    after decay_at of the steps (the optimizer and its momentum go on), grouped or alone alike:
    the numbers of train_net with that StepDecay, and not those of a constant rate."""
    from batchnorm.lab import experiments
    from batchnorm.lab.experiment import Context
    from batchnorm.lab.experiments.cnn import NetJob, ScheduledConvConfig, train_jobs

    data = tiny_images()
    config = ScheduledConvConfig(channels=CHANNELS, evals=4, decay_at=0.5, decay_factor=0.1)
    jobs = [
        NetJob(f"{norm}-s{seed}", norm, seed, lambda seed=seed: iid_batches(60, 8, seed), "t",
               {"num_groups": 2} if norm == "gn" else {})
        for norm, seed in (("bn", 0), ("gn", 1), ("bn", 2))
    ]  # fmt: skip

    def run(name: str, **changes: Any) -> list[dict]:
        (tmp_path / name).mkdir(exist_ok=True)
        ctx = Context(tmp_path / name, experiments.get("small-batch"), None, quick=True)
        return train_jobs(ctx, replace(config, **changes), data, jobs, steps=12, lr=0.05)

    together, alone = run("together"), run("alone", grouped=False)
    options = {"momentum": 0.9, "evals": 4, "desc": "t", "steps": 12}
    for k, job in enumerate(jobs):

        def net(job: NetJob = job) -> nn.Module:
            return conv_net(job.norm, CHANNELS, CLASSES, job.seed, head="flatten",
                            image_shape=(IMAGE, IMAGE), **job.options)  # fmt: skip

        expected = train_net(net(), data, job.batches(), lr=StepDecay(0.05, 6, 0.1), **options)
        constant = train_net(net(), data, job.batches(), lr=0.05, **options)
        assert expected["steps"] == [3, 6, 9, 12]
        assert expected["test_loss"][:2] == constant["test_loss"][:2]  # the same until the drop
        assert expected["test_loss"][2:] != constant["test_loss"][2:]
        assert_results_equal(alone[k], expected, f"alone {k}")
        assert_results_equal(together[k], expected, f"together {k}")
    assert not list((tmp_path / "together" / "jobs").glob("*.ckpt"))
