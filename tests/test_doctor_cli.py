"""``batchnorm doctor`` on every input form: whole model, ExportedProgram, builder + state_dict;
data as .pt/.npy/.npz, a function yielding batches, or --synthetic; report, --fix, bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.cli import main

BUILDER = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3))

    def batches():
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            yield torch.randn(16, 3, 4, 4, generator=g) * 2 + 1, torch.randint(0, 3, (16,))

    def no_norm():
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 3))

    def frozen():
        import batchnorm.nn as bnn

        return nn.Sequential(nn.Conv2d(3, 4, 3), bnn.FrozenBatchNorm(4))
    """
)


@pytest.fixture()
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    (tmp_path / "doctor_builder.py").write_text(BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import doctor_builder

    importlib.reload(doctor_builder)
    net = doctor_builder.build()
    with torch.no_grad():  # moving averages of a far-off distribution: stale
        net.train()(torch.randn(32, 3, 4, 4) * 5 - 3)
    net.eval()
    x = torch.randn(96, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 + 1
    y = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(3))
    paths = {
        "whole": tmp_path / "whole.pt",
        "exported": tmp_path / "net.pt2",
        "decomposed": tmp_path / "decomposed.pt2",
        "state": tmp_path / "state.pt",
        "x_pt": tmp_path / "x.pt",
        "xy_pt": tmp_path / "xy.pt",
        "x_npy": tmp_path / "x.npy",
        "y_npy": tmp_path / "y.npy",
        "xy_npz": tmp_path / "xy.npz",
    }
    torch.save(net, paths["whole"])
    torch.save(net.state_dict(), paths["state"])
    program = torch.export.export(net, (x[:8],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, paths["exported"])
    torch.export.save(program.run_decompositions(), paths["decomposed"])
    torch.save(x, paths["x_pt"])
    torch.save((x, y), paths["xy_pt"])
    np.save(paths["x_npy"], x.numpy())
    np.save(paths["y_npy"], y.numpy())
    np.savez(paths["xy_npz"], x=x.numpy(), y=y.numpy())
    return paths


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models: one thread is fastest, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MODELS = ("whole", "exported", "decomposed", "builder")
DATA = ("x_pt", "xy_pt", "x_npy", "xy_npz", "function", "synthetic")


def _model_args(files: dict[str, Path], form: str) -> list[str]:
    if form == "builder":
        return ["doctor_builder:build", "--state-dict", str(files["state"])]
    return [str(files[form])]


def _data_args(files: dict[str, Path], form: str) -> list[str]:
    if form == "function":
        return ["--data", "doctor_builder:batches"]
    if form == "synthetic":
        return ["--synthetic", "16,3,4,4"]
    return ["--data", str(files[form])]


@pytest.mark.parametrize("model", MODELS)
def test_every_model_form_finds_the_stale_statistics(files, model, capsys):
    code = main(["doctor", *_model_args(files, model), "--data", str(files["xy_pt"])])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "stale-statistics" in out and ("[warning]" in out or "[error]" in out)
    assert "mean shift" in out.splitlines()[0]  # the per-layer table comes first
    assert "accuracy: eval" in out  # labels from the (x, y) file


@pytest.mark.parametrize("data", DATA)
def test_every_data_form_runs(files, data, capsys):
    code = main(["doctor", str(files["whole"]), *_data_args(files, data), "--no-progress"])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    assert "finding(s)" in out
    assert ("accuracy: eval" in out) == (data in ("xy_pt", "xy_npz", "function"))


def test_labels_from_a_separate_file(files, capsys):
    args = ["doctor", str(files["whole"]), "--data", str(files["x_npy"]), "--labels"]
    main([*args, str(files["y_npy"]), "--no-progress"])
    assert "accuracy: eval" in capsys.readouterr().out


def test_report_with_plots_and_progress_bar(files, tmp_path, capsys):
    out_dir = tmp_path / "report"
    main(["doctor", str(files["whole"]), "--data", str(files["xy_pt"]), "--out", str(out_dir)])
    captured = capsys.readouterr()
    assert "diagnosing batch norm" in captured.err  # tqdm, on stderr
    report = (out_dir / "report.md").read_text()
    assert "## Findings" in report and "`stale-statistics`" in report
    assert "![" in report and "statistics.png" in report
    for name in ("statistics.png", "channels.png", "diagnosis.json"):
        assert (out_dir / name).stat().st_size > 1000, name
    assert (out_dir / "statistics.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("model", ("whole", "exported"))
def test_fix_round_trip(files, model, tmp_path, capsys):
    fixed_path = tmp_path / ("fixed.pt2" if model == "exported" else "fixed.pt")
    args = ["doctor", str(files[model]), "--data", str(files["xy_pt"]), "--no-progress"]
    main([*args, "--fix", str(fixed_path), "--fold"])
    out = capsys.readouterr().out
    assert "fix: ok" in out and fixed_path.is_file(), out
    args[1] = str(fixed_path)
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0, out  # healthy now
    if model == "whole":
        fixed = torch.load(fixed_path, weights_only=False)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())


@pytest.mark.parametrize("decompose", (False, True))
def test_exported_batch_norm_is_lifted_to_modules_with_the_same_outputs(decompose):
    from batchnorm.inference.exported import ExportedBatchNorm, lift_exported_batch_norm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    with torch.no_grad():
        net(torch.randn(8, 3, 8, 8) * 3 + 1)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(net, (x,))
    module = (program.run_decompositions() if decompose else program).module()
    assert lift_exported_batch_norm(module) == 2
    layers = [m for m in module.modules() if isinstance(m, ExportedBatchNorm)]
    assert len(layers) == 2 and not any(m.training for m in layers)
    torch.testing.assert_close(module(x), net(x))
    torch.testing.assert_close(layers[0].running_var, net[1].running_var)


def test_a_model_without_batch_norm(files, capsys):
    assert main(["doctor", "doctor_builder:no_norm", "--synthetic", "8,3,4,4"]) == 0
    assert "no batch-norm layer" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.pt", "--synthetic", "8,3"], "no such file"),
        (["{state}", "--synthetic", "8,3,4,4"], "holds a state_dict"),
        (["{whole}", "--synthetic", "8,x"], "--synthetic"),
        (["nomodule_xyz:build", "--synthetic", "8,3"], "cannot import"),
        (["doctor_builder:nothing", "--synthetic", "8,3"], "no callable"),
        (["{whole}", "--data", "{y_npy}"], "need (N, C, ...)"),
        (["{whole}", "--synthetic", "8,5,4,4"], "cannot run on this data"),
        (["{whole}", "--data", "{x_npy}", "--labels", "{state}"], "needs an 'input'"),
        (["doctor_builder:build", "--state-dict", "{x_pt}", "--synthetic", "8,3"], "holds a"),
        (["{whole}", "--synthetic", "8,3,4,4", "--fold"], "--fold goes with --fix"),
        (["doctor_builder:frozen", "--synthetic", "8,3,4,4", "--fix", "x.pt"], "nothing to"),
    ],
)
def test_bad_input_is_one_line(files, args, message, capsys):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    assert main(["doctor", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchnorm doctor: error:") and message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_the_worked_example_of_the_docs(tmp_path, capsys, monkeypatch):
    """docs/doctor.md's example: the findings on its page, and --fix clears the stale ones."""
    import importlib.util

    path = Path(__file__).parents[1] / "docs" / "doctor_example.py"
    spec = importlib.util.spec_from_file_location("doctor_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["doctor", "model.pt", "--data", "test.pt", "--json", "--no-progress"]) == 1
    import json

    found = json.loads(capsys.readouterr().out)
    above_info = {(f["kind"], f["layer"]) for f in found["findings"] if f["severity"] != "info"}
    assert {
        ("stale-statistics", None),
        ("train-eval-gap", None),
        ("frozen-but-updating", "1"),
        ("keras-momentum", "4"),
    } <= above_info
    page = (Path(__file__).parents[1] / "docs" / "doctor.md").read_text()
    for kind, layer in above_info:
        assert f"[warning] {kind} at {layer or '(model)'}" in page
    main(["doctor", "model.pt", "--data", "train.pt", "--num-batches", "32", "--fix", "fixed.pt"])
    capsys.readouterr()
    main(["doctor", "fixed.pt", "--data", "test.pt", "--json", "--no-progress"])
    after = json.loads(capsys.readouterr().out)
    kinds = {f["kind"] for f in after["findings"] if f["severity"] != "info"}
    assert kinds == {"frozen-but-updating", "keras-momentum"}
    assert after["metrics"]["accuracy_eval"] > found["metrics"]["accuracy_eval"] + 0.03


def test_help_lists_doctor(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "\n    doctor " in capsys.readouterr().out
