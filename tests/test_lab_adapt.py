"""The lab experiment ``adapt`` (test-time adaptation on corrupted data): the corruptions, the
rules on made-up numbers, and a complete quick run on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batchnorm.lab import experiments
from batchnorm.lab.config import ConfigError
from batchnorm.lab.experiment import make_config, run_experiment
from batchnorm.lab.experiments.adapt import (
    CORRUPTIONS,
    METHODS,
    Config,
    Numbers,
    corrupt,
    judge,
)
from tests.lab_helpers import check_run_dir, table

pytestmark = pytest.mark.usefixtures("lab_quiet")


def _images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((6, 12, 12)).astype(np.float32)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_seeded_in_range_and_change_the_images(name):
    x = _images()
    a = corrupt(x, name, Config(), seed=3)
    assert a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, corrupt(x, name, Config(), seed=3))
    assert np.abs(a - x).mean() > 0.01


def test_each_corruption_does_what_it_says():
    x = _images()
    config = Config()
    contrast = corrupt(x, "contrast", config, 0)
    assert np.allclose(contrast.std(axis=(1, 2)), config.contrast * x.std(axis=(1, 2)), rtol=1e-5)
    pixelated = corrupt(x, "pixelate", config, 0)
    k = config.pixelate
    assert np.allclose(pixelated[:, :k, :k], x[:, :k, :k].mean(axis=(1, 2), keepdims=True))
    blurred = corrupt(x, "blur", config, 0)
    assert blurred.std() < 0.5 * x.std()  # smoothing removes the pixel noise
    assert np.allclose(blurred.mean(), x.mean(), atol=0.02)
    impulse = corrupt(x, "impulse-noise", config, 0)
    changed = impulse != x
    assert abs(changed.mean() - config.impulse_fraction) < 0.05
    assert set(np.unique(impulse[changed])) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", config, 0)


def _errors(source: float, bn: float, adabn: float, tent: float) -> dict[str, float]:
    return dict(zip(METHODS, (source, bn, adabn, tent), strict=True))


@pytest.mark.parametrize(
    "corrupted,expected",
    [
        (_errors(0.40, 0.17, 0.18, 0.14), [True, True, True]),  # the paper's shape
        (_errors(0.12, 0.13, 0.13, 0.12), [False, False, True]),  # no shift to adapt to
        (_errors(0.40, 0.17, 0.45, 0.20), [True, False, False]),  # adaptation made it worse
    ],
)
def test_rules_on_made_up_numbers(corrupted, expected):
    clean = _errors(0.10, 0.11, 0.10, 0.11)
    claims = judge(Numbers(Config().min_shift, clean, {"blur": corrupted, "contrast": corrupted}))
    assert [c.held for c in claims] == expected


def test_bad_config_says_what_to_change():
    adapt = experiments.get("adapt")
    for override, message in (
        ("corruptions=fog", "corruptions must be"),
        ("contrast=1.5", "contrast must lie"),
        ("tent_batch=1", "tent_batch must be"),
    ):
        with pytest.raises((ConfigError, ValueError), match=message):
            make_config(adapt, quick=True, overrides=[override])


def test_quick_run_is_complete(tmp_path: Path):
    adapt = experiments.get("adapt")
    overrides = ["dataset=digits", "threads=1", "seeds=2", "evals=2", "epochs=3", "tent_batch=64"]
    config = make_config(adapt, quick=True, overrides=overrides)
    result = run_experiment(adapt, config, quick=True, out=tmp_path)
    metrics = check_run_dir(result.run_dir, "adapt")
    assert [c["name"] for c in metrics["claims"]] == [
        "corruptions hurt",
        "statistics adapt",
        "TENT adapts further",
    ]
    errors = metrics["metrics"]["errors"]
    assert set(errors) == {"clean", *CORRUPTIONS}
    for per_method in errors.values():
        assert set(per_method) == set(METHODS)
        assert all(len(v) == 2 and all(0 <= e <= 1 for e in v) for v in per_method.values())
    report = (result.run_dir / "report.md").read_text()
    rows = table(report, "Test error by test set and method (mean ± std over seeds)")
    assert [r[0] for r in rows][-1].startswith("paper: CIFAR-10-C")
    assert rows[-1][1:] == ["40.8", "17.3", "-", "14.3"]
    assert (result.run_dir / "adapt.png").stat().st_size > 1000
