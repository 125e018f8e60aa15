"""Experiment configs: --set overrides checked against types, quick mode, --seeds, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from batchnorm.lab import experiments
from batchnorm.lab.config import ConfigError, apply_overrides, config_to_dict, field_docs
from batchnorm.lab.experiment import config_from_dict, make_config
from batchnorm.lab.experiments.fig1 import Config as Fig1Config

ALL = experiments.all_experiments()


def test_overrides_convert_to_the_declared_types() -> None:
    config = apply_overrides(
        Fig1Config(),
        [
            "lr=5e-2",
            "steps=5e4",
            "hidden=(32, 16)",
            "eval-examples=none",
            "dataset=digits",
            "bn_impl = torch",
            "train_subset=1_000",
        ],
    )
    assert config.lr == 0.05 and isinstance(config.lr, float)
    assert config.steps == 50_000 and isinstance(config.steps, int)
    assert config.hidden == (32, 16)
    assert config.eval_examples is None
    assert config.dataset == "digits" and config.bn_impl == "torch"
    assert config.train_subset == 1000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stpes=10", r"unknown key 'stpes' for Config; did you mean steps"),
        ("steps=ten", r"steps: 'ten' is not an integer"),
        ("steps=1.5", r"steps: '1.5' is not an integer"),
        ("lr=fast", r"lr: 'fast' is not a number"),
        ("dataset=cifar10", r"dataset: 'cifar10' is not one of mnist, fashion-mnist"),
        ("hidden=10,x", r"hidden: 'x' is not an integer"),
        ("steps", r"expected key=value"),
        ("steps=0", r"steps must be at least 1"),
        ("batch_size=1", r"batch_size must be at least 2"),
        ("tracked_unit=100", r"tracked_unit must be a unit of the last hidden layer, 0..99"),
        ("train_subset=10", r"train_subset \(10\) must hold at least one batch"),
        ("momentum=1", r"momentum must be below 1"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Fig1Config(), [override])


def test_quick_then_seeds_then_set() -> None:
    fig1 = experiments.get("fig1")
    full = make_config(fig1)
    assert (full.steps, full.batch_size, full.seeds, full.hidden) == (50_000, 60, 3, (100,) * 3)
    quick = make_config(fig1, quick=True)
    assert quick.steps < full.steps and quick.seeds == 2
    assert make_config(fig1, quick=True, seeds=5).seeds == 5
    config = make_config(fig1, quick=True, seeds=5, overrides=["seeds=4", "steps=77"])
    assert (config.seeds, config.steps) == (4, 77)  # --set comes last
    with pytest.raises(ConfigError, match="--seeds must be at least 1"):
        make_config(fig1, seeds=0)


@pytest.mark.parametrize("experiment", ALL, ids=lambda e: e.name)
def test_every_field_is_documented_and_round_trips(experiment) -> None:
    for name, type_name, _default, help_text in field_docs(experiment.config_cls):
        assert help_text.strip(), f"{experiment.name}.{name} has no help text"
        assert type_name
    for quick in (False, True):
        config = experiment.default_config(quick)
        config.validate()
        as_json = json.loads(json.dumps(config_to_dict(config)))
        assert config_from_dict(experiment.config_cls, as_json) == config


@pytest.mark.parametrize("experiment", ALL, ids=lambda e: e.name)
def test_quick_mode_is_shorter(experiment) -> None:
    full, quick = experiment.default_config(), experiment.default_config(quick=True)
    assert getattr(quick, "seeds", 1) <= getattr(full, "seeds", 1)
    # Every experiment sizes its work differently (steps, epochs, instances, repeats...): quick
    # mode must shrink at least one integer count and grow none.
    counts = [
        (f.name, getattr(full, f.name), getattr(quick, f.name))
        for f in dataclasses.fields(full)
        if type(getattr(full, f.name)) is int and type(getattr(quick, f.name)) is int
    ]
    assert any(q < v for _, v, q in counts), f"quick mode shrinks no count: {counts}"
    sizes = ("steps", "epochs", "seeds", "repeats", "instances", "iterations", "samples")
    grown = [(n, v, q) for n, v, q in counts if q > v and any(k in n for k in sizes)]
    assert not grown, f"quick mode grows {grown}"


def test_sweep_fields_are_checked() -> None:
    lr = experiments.get("lr")
    assert make_config(lr, overrides=["lrs=0.5,5"]).lrs == (0.5, 5.0)
    with pytest.raises(ConfigError, match="lrs must list positive learning rates"):
        make_config(lr, overrides=["lrs=-1"])
    with pytest.raises(ConfigError, match="activations: 'gelu' is not one of"):
        make_config(experiments.get("nonlinearity"), overrides=["activations=relu,gelu"])
    with pytest.raises(ConfigError, match="must include a saturating one"):
        make_config(experiments.get("nonlinearity"), overrides=["activations=relu"])
    with pytest.raises(ConfigError, match=r"dropout must lie in \(0, 1\)"):
        make_config(experiments.get("regularization"), overrides=["dropout=1"])


def test_config_from_dict_rejects_unknown_keys() -> None:
    values = config_to_dict(Fig1Config()) | {"learning_rate": 1}
    with pytest.raises(ConfigError, match="unknown config keys for Config: learning_rate"):
        config_from_dict(Fig1Config, values)


def test_experiment_names_and_aliases() -> None:
    assert [e.name for e in ALL] == list(experiments.NAMES)
    assert experiments.get("mnist").name == "fig1"
    assert experiments.get(" FIG1 ").name == "fig1"
    with pytest.raises(KeyError, match="unknown experiment 'fig2'; known: fig1 \\(mnist\\)"):
        experiments.get("fig2")
    for e in ALL:
        assert dataclasses.is_dataclass(e.config_cls)
        assert e.claim and e.paper and e.title


def test_every_experiment_config_extends_the_root_run_config() -> None:
    """One family of configs: seed and threads come from RunConfig, the seeds from SeedsConfig,
    the data set and its subsets from DataConfig (an experiment redeclares a field only to change
    its default)."""
    from batchnorm.lab import experiments
    from batchnorm.lab.config import DataConfig, RunConfig, SeedsConfig

    without_data = {"theorems": RunConfig, "decoupling": SeedsConfig}
    for experiment in experiments.all_experiments():
        name, cls = experiment.name, experiment.config_cls
        assert issubclass(cls, without_data.get(name, DataConfig)), name
        config = cls()
        if isinstance(config, SeedsConfig):
            assert config.seed_list() == list(range(config.seed, config.seed + config.seeds))
