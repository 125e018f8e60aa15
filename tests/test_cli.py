"""The top-level ``batchnorm`` command: --help, --version, env, check (``lab`` and ``bench`` have
their own tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import batchnorm
from batchnorm.cli import main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("env", "check", "lab", "bench"):
        assert f"\n    {command} " in out, command


def test_version_from_the_installed_entry_point() -> None:
    script = Path(sys.executable).parent / "batchnorm"  # the console script pip installed
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .)"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"batchnorm {batchnorm.__version__}"


def test_env_reports_versions_devices_backends_and_export(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fields = {line.split()[0]: line for line in lines if line and not line.startswith(" ")}
    assert fields["torch"].split()[1] == torch.__version__
    assert fields["batchnorm"].split()[1] == batchnorm.__version__
    assert "torch.export" in fields["export"]
    backend_lines = [line.split()[0] for line in lines if line.startswith("  ")]
    from batchnorm.ops.cpu import _build

    # "cpu walk" (the channels-last dx pass on this CPU) where the kernels are built already
    # and "cpu nt" (from which size passes stream their stores)
    built = ["cpu", "cpu"] if _build._module is not None or _build._finished_binary() else []
    assert backend_lines == ["torch", "explicit", "triton", "cpu", "cpu", *built, "default", "auto"]
    if built:
        line = next(line for line in lines if line.startswith("  cpu walk "))
        assert line.split()[2] in ("rows", "chunks")
        line = next(line for line in lines if line.startswith("  cpu nt "))
        assert "MB moved per pass" in line or "never" in line
    cache = next(line for line in lines if line.startswith("  cpu cache "))
    assert "MB of freed outputs" in cache and "BATCHNORM_CPU_CACHE_MB" in cache
    assert any("torch     available" in line for line in lines)
    auto = next(line for line in lines if line.startswith("  auto "))
    assert "cpu: torch (float32, bfloat16, float16, float64)" in auto  # CPU_AUTO_DTYPES empty


def test_check_passes_every_case_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--backend", "explicit", "--dtype", "float64", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("explicit ")]
    assert rows and all(line.rstrip().endswith("yes") for line in rows)
    assert out.rstrip().endswith(f"{len(rows)} passed, 0 failed")


def test_check_runs_the_cpu_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    # The C++ kernels are the backend most likely to break on a new machine (compiler, ISA):
    # `--backend cpu` checks them alone; float64 falls back to torch's kernel, visibly.
    from batchnorm.ops import cpu

    ok, reason = cpu.status()
    if not ok:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {reason}")
    args = ["check", "--backend", "cpu", "--dtype", "float32", "--dtype", "float64"]
    assert main([*args, "--seed", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("cpu")]
    assert any(line.startswith("cpu ") and " float32 " in line for line in rows)
    assert all(line.startswith("cpu->torch ") for line in rows if " float64 " in line)
    assert rows and all(line.rstrip().endswith("yes") for line in rows)


def test_check_rejects_an_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--backend", "nonsense"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nonsense'" in err and "explicit" in err
