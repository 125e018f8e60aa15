"""``batchnorm doctor``: diagnose a saved model's batch norm from the command line, and fix it.

::

    batchnorm doctor MODEL [--state-dict SD] (--data DATA | --synthetic SHAPE) [--labels L]
                     [--batch-size B] [--num-batches K] [--out DIR] [--fix OUT [--fold]]
                     [--json] [--no-progress]

MODEL is a whole model saved with ``torch.save(model, path)``, an ``ExportedProgram`` saved with
``torch.export.save`` (``.pt2``; its ``aten.batch_norm`` calls become batch-norm modules again, so
they can be measured), or ``package.module:function`` returning a model (``--state-dict`` then
loads weights into it). DATA is a tensor file (``.pt`` holding a tensor, an ``(inputs, labels)``
pair or a dict with ``input``/``x`` and ``label``/``labels``/``y``; ``.npy``; ``.npz`` with the
same keys or its first two arrays), split into batches of ``--batch-size``, or
``package.module:function`` returning an iterable of batches. ``--synthetic 64,3,32,32`` draws
standard-normal batches of that shape (a smoke check: no statistic of real data).

Exit status: 0 when no finding is above "info", 1 when there are warnings or errors, 2 for bad
input (one line on stderr saying what was wrong).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

__all__ = ["DoctorInputError", "load_batches", "load_model", "main", "register"]


class DoctorInputError(Exception):
    """Unusable command-line input; the message says what was wrong and what to do."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``doctor`` command to the ``batchnorm`` parser."""
    doctor = subparsers.add_parser(
        "doctor",
        help="find what is wrong with a model's batch norm, and fix it",
        description=(
            "Diagnose the batch-norm layers of a saved model on some data: stale moving "
            "averages, train/eval gap, NaN statistics, dead channels, small batches, Keras "
            "momentum, frozen layers that update, foldable layers. See docs/doctor.md."
        ),
    )
    doctor.add_argument(
        "model",
        metavar="MODEL",
        help="torch.save'd whole model, a .pt2 ExportedProgram, or package.module:function",
    )
    doctor.add_argument("--state-dict", metavar="SD", help="weights to load into MODEL")
    source = doctor.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", metavar="DATA", help=".pt/.npy/.npz tensor file, or package.module:function"
    )
    source.add_argument(
        "--synthetic", metavar="SHAPE", help="random N(0, 1) batches of this shape, e.g. 64,3,32,32"
    )
    doctor.add_argument("--labels", metavar="L", help="labels file (.pt/.npy) for a tensor DATA")
    doctor.add_argument(
        "--batch-size", type=int, default=64, metavar="B", help="split tensor data (default 64)"
    )
    doctor.add_argument(
        "--num-batches", type=int, default=16, metavar="K", help="batches to use (default 16)"
    )
    doctor.add_argument("--out", metavar="DIR", help="write report.md, plots and diagnosis.json")
    doctor.add_argument(
        "--fix", metavar="OUT", help="recalibrate a copy on the data, check it, torch.save it here"
    )
    doctor.add_argument("--fold", action="store_true", help="with --fix: also fold the layers")
    doctor.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    doctor.add_argument("--no-progress", action="store_true", help="no progress bar")
    doctor.add_argument("--seed", type=int, default=0, help="seed of --synthetic (default 0)")
    doctor.set_defaults(func=main)


def _import_callable(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DoctorInputError(f"{what} {spec!r} is not a file and not package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DoctorInputError(
            f"{what} {spec!r}: cannot import {module_name!r} ({error}); is it on PYTHONPATH?"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise DoctorInputError(f"{what} {spec!r}: {module_name} has no callable {attr!r}")
    return function


def _torch_load(path: Path, what: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error here
        raise DoctorInputError(
            f"{what} {str(path)!r} is not a file torch.load can read ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from None


def load_model(spec: str, state_dict: str | None = None) -> Any:
    """The model named on the command line (see the module docstring)."""
    import torch

    path = Path(spec)
    if path.is_file():
        if path.suffix == ".pt2":
            try:
                program = torch.export.load(str(path))
            except Exception as error:  # noqa: BLE001
                raise DoctorInputError(
                    f"MODEL {spec!r} is not an ExportedProgram torch.export.load can read "
                    f"({type(error).__name__})"
                ) from None
            model = program.module()
            from batchnorm.inference.exported import lift_exported_batch_norm

            lift_exported_batch_norm(model)
        else:
            model = _torch_load(path, "MODEL")
            if isinstance(model, dict):
                raise DoctorInputError(
                    f"MODEL {spec!r} holds a state_dict, not a model: give a builder "
                    "package.module:function as MODEL and this file as --state-dict"
                )
    elif ":" in spec and not path.suffix:
        model = _import_callable(spec, "MODEL")()
    else:
        raise DoctorInputError(f"MODEL {spec!r}: no such file (nor package.module:function)")
    if not isinstance(model, torch.nn.Module):
        raise DoctorInputError(
            f"MODEL {spec!r} gave a {type(model).__name__}, not a torch.nn.Module"
        )
    from batchnorm.inference.intake import check_model

    try:
        check_model(model, "batchnorm doctor", lift="no")
    except TypeError as error:  # TorchScript: say so before any data is read
        raise DoctorInputError(f"MODEL {spec!r}: {str(error).split(': ', 1)[1]}") from None
    if state_dict is not None:
        weights = _torch_load(Path(state_dict), "--state-dict")
        if not isinstance(weights, dict):
            raise DoctorInputError(f"--state-dict {state_dict!r} holds a {type(weights).__name__}")
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise DoctorInputError(
                f"--state-dict {state_dict!r} does not fit MODEL: {first}"
            ) from None
    return model


def _as_tensor(value: Any, what: str) -> Any:
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise DoctorInputError(f"{what} holds a {type(value).__name__}, not a tensor or array")
    return value.float() if value.is_floating_point() or value.dtype == torch.uint8 else value


def _read_arrays(path: Path, what: str) -> tuple[Any, Any]:
    """``(inputs, labels or None)`` from a .pt/.npy/.npz file."""
    import numpy as np

    if not path.is_file():
        raise DoctorInputError(f"{what} {str(path)!r}: no such file")
    if path.suffix == ".npy":
        return _as_tensor(np.load(path), what), None
    if path.suffix == ".npz":
        arrays = dict(np.load(path))
        names = list(arrays)
        x_key = next(
            (k for k in ("input", "inputs", "x", "X") if k in arrays), names[0] if names else None
        )
        if x_key is None:
            raise DoctorInputError(f"{what} {str(path)!r} holds no array")
        y_key = next(
            (k for k in ("label", "labels", "target", "y", "Y") if k in arrays),
            next((k for k in names if k != x_key), None),
        )
        return _as_tensor(arrays[x_key], what), (
            None if y_key is None else _as_tensor(arrays[y_key], what)
        )
    value = _torch_load(path, what)
    if isinstance(value, dict):
        x = next((value[k] for k in ("input", "inputs", "x") if k in value), None)
        y = next((value[k] for k in ("label", "labels", "target", "y") if k in value), None)
        if x is None:
            raise DoctorInputError(f"{what} {str(path)!r}: a dict needs an 'input' or 'x' key")
        return _as_tensor(x, what), None if y is None else _as_tensor(y, what)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _as_tensor(value[0], what), _as_tensor(value[1], what)
    return _as_tensor(value, what), None


def load_batches(args: argparse.Namespace) -> list[Any]:
    """The batches named on the command line: tensors or ``(input, label)`` pairs."""
    import itertools

    import torch

    if args.batch_size < 1 or args.num_batches < 1:
        raise DoctorInputError("--batch-size and --num-batches must be positive")
    if args.synthetic is not None:
        try:
            shape = tuple(int(part) for part in args.synthetic.replace("x", ",").split(","))
        except ValueError:
            shape = ()
        if len(shape) < 2 or min(shape) < 1:
            raise DoctorInputError(
                f"--synthetic {args.synthetic!r}: give a batch shape N,C[,...], e.g. 64,3,32,32"
            )
        generator = torch.Generator().manual_seed(args.seed)
        return [torch.randn(shape, generator=generator) for _ in range(args.num_batches)]
    path = Path(args.data)
    if path.suffix in (".pt", ".pth", ".npy", ".npz") or path.is_file():
        x, y = _read_arrays(path, "--data")
        if args.labels is not None:
            y = _read_arrays(Path(args.labels), "--labels")[0]
            y = y.long() if not y.is_floating_point() else y
        if x.dim() < 2:
            raise DoctorInputError(
                f"--data holds a tensor of shape {tuple(x.shape)}: need (N, C, ...)"
            )
        if y is not None and y.shape[0] != x.shape[0]:
            raise DoctorInputError(f"--data has {x.shape[0]} samples but {y.shape[0]} labels")
        inputs = list(x.split(args.batch_size))[: args.num_batches]
        if y is None:
            return inputs
        return list(zip(inputs, y.split(args.batch_size)))
    batches = _import_callable(args.data, "--data")()
    try:
        return list(itertools.islice(iter(batches), args.num_batches))
    except TypeError:
        raise DoctorInputError(
            f"--data {args.data!r} returned a {type(batches).__name__}, not an iterable of batches"
        ) from None


def _save(model: Any, path: str, source: str, batch: Any) -> str:
    """Save the fixed model like its source: an ExportedProgram for a .pt2, else torch.save."""
    import io

    import torch

    if source.endswith(".pt2"):
        example = batch[0] if isinstance(batch, (tuple, list)) else batch
        try:
            program = torch.export.export(
                model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)
            )
        except Exception:  # noqa: BLE001 - a static batch size when it cannot be symbolic
            program = torch.export.export(model, (example,))
        torch.export.save(program, path)
        return f"{path} (ExportedProgram, torch.export.save)"
    buffer = io.BytesIO()  # a model that cannot be pickled leaves no half-written file
    try:
        torch.save(model, buffer)
    except Exception as error:  # noqa: BLE001
        raise DoctorInputError(
            f"--fix: the model cannot be pickled ({error}); nothing saved"
        ) from None
    Path(path).write_bytes(buffer.getvalue())
    return f"{path} (whole model, torch.save)"


def main(args: argparse.Namespace) -> int:
    """Run ``batchnorm doctor`` with parsed arguments; returns the exit status."""
    try:
        return _run(args)
    except DoctorInputError as error:
        print(f"batchnorm doctor: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import json

    from batchnorm.inference.doctor import diagnose, fix

    if args.fold and not args.fix:
        raise DoctorInputError("--fold goes with --fix OUT (fold the fixed copy before saving)")
    model = load_model(args.model, args.state_dict)
    batches = load_batches(args)
    if not batches:
        raise DoctorInputError("the data holds no batch")
    try:
        diagnosis = diagnose(model, batches, progress=not args.no_progress)
    except (TypeError, ValueError, RuntimeError, AssertionError, IndexError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DoctorInputError(f"the model cannot run on this data: {first}") from None
    if args.json:
        print(json.dumps(diagnosis.to_dict(), indent=1))
    else:
        print(diagnosis)
    if args.out:
        from batchnorm.inference.doctor_report import write_report

        path = write_report(diagnosis, args.out, title=args.model)
        print(f"report: {path}")
    if args.fix:
        if not diagnosis.layers:
            raise DoctorInputError("--fix: the model has no batch-norm layer to fix")
        try:
            fixed, report = fix(
                model, batches, fold_layers=args.fold, progress=not args.no_progress
            )
        except (ValueError, RuntimeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DoctorInputError(f"--fix: {first}") from None
        print(report)
        if not report.ok:
            print("batchnorm doctor: the fixed model failed the check; not saved", file=sys.stderr)
            return 1
        print(f"fixed model saved to {_save(fixed, args.fix, args.model, batches[0])}")
    return 0 if diagnosis.healthy else 1
