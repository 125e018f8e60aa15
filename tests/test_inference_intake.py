"""The inference tools on model forms whose batch norm is not a torch.nn layer.

TorchScript modules and ``torch.export`` graphs hold batch norm that is no ``_BatchNorm``
module: ``diagnose`` called such a model batch-norm free and healthy, ``fold`` and
``accumulate`` did nothing, silently, and ``recalibrate`` said there was no batch norm.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import adapt
from batchnorm.cli import main
from batchnorm.doctor import diagnose, fix
from batchnorm.inference import fold, recalibrate

BATCHES = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 + 1
           for i in range(6)]  # fmt: skip


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


TOOLS = {
    "diagnose": lambda m: diagnose(m, BATCHES),
    "fix": lambda m: fix(m, BATCHES),
    "recalibrate": lambda m: recalibrate(m, BATCHES),
    "fold": lambda m: fold(m),
    "adabn": lambda m: adapt.adabn(m, BATCHES),
    "tent": lambda m: adapt.tent(m, BATCHES),
    "accumulate": lambda m: batchnorm.accumulate(m, micro_batches=2),
}


@pytest.mark.parametrize("tool", list(TOOLS))
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused_with_the_remedy(how, tool):
    net = _net()
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, BATCHES[0])
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    with pytest.raises(TypeError, match=r"TorchScript .* batch norm at \['1'\].*state_dict"):
        TOOLS[tool](scripted)
    after = scripted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_torchscript_without_batch_norm_is_just_batch_norm_free():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert [f.kind for f in diagnose(scripted, BATCHES).findings] == ["no-batch-norm"]


@pytest.mark.parametrize("tool", ["diagnose", "recalibrate", "fold", "accumulate"])
def test_an_exported_program_or_a_non_module_is_a_type_error(tool):
    program = torch.export.export(_net(), (BATCHES[0],))
    with pytest.raises(TypeError, match=r"ExportedProgram.*program\.module\(\)"):
        TOOLS[tool](program)
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got str"):
        TOOLS[tool]("model.pt")


def test_an_exported_graph_is_diagnosed_and_recalibrated_like_the_eager_model():
    net = _net()
    graph = torch.export.export(net, (BATCHES[0],)).module()
    state = {k: v.clone() for k, v in graph.state_dict().items()}
    code = graph.code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kinds = {f.kind for f in diagnose(graph, BATCHES).findings}
        assert "no-batch-norm" not in kinds and "stale-statistics" in kinds
        # diagnose leaves the graph as it was (it lifts a copy)
        assert graph.code == code
        assert all(torch.equal(state[k], v) for k, v in graph.state_dict().items())
        recalibrate(graph, BATCHES)  # in place: the calls become layers holding the same tensors
        recalibrate(net, BATCHES)
    torch.testing.assert_close(graph.get_submodule("1").running_mean, net[1].running_mean)
    torch.testing.assert_close(graph.get_submodule("1").running_var, net[1].running_var)
    torch.testing.assert_close(graph(BATCHES[0]), net(BATCHES[0]))


@pytest.mark.parametrize("tool", ["fix", "adabn", "tent", "accumulate", "fold"])
def test_the_other_tools_run_on_an_exported_graph(tool):
    graph = torch.export.export(_net(), (BATCHES[0],)).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TOOLS[tool](graph)


def test_the_doctor_command_refuses_a_torchscript_file(tmp_path, capsys):
    model, data = tmp_path / "model.pt", tmp_path / "data.pt"
    torch.jit.save(torch.jit.script(_net()), str(model))
    torch.save(torch.cat(BATCHES), data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["doctor", str(model), "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is TorchScript" in err and "Traceback" not in err
