"""The batch-norm layers' fast path: a call like one that passed every check runs its kernel
directly, with no checks, no dispatch and no environment lookup.

A layer's first call with a given signature takes the full path (validation, backend choice). If
that resolved to PyTorch's native kernel (or to the C++ CPU kernels), the layer keeps a
:class:`CallPlan`: what the checks depended on, and the tensors they checked. A later call runs
the plan when

- the input is a plain tensor with the same shape, strides (the layout, which ``"auto"`` may
  depend on: :data:`batchnorm.backends.CPU_AUTO_CASES`), dtype and device;
- the layer's mode and options (training, momentum, eps, track_running_stats, num_features,
  backend, nonfinite) are the same;
- the parameter and buffer objects in the layer's dictionaries are the very ones checked (a
  Parameter replaced, a parametrization registered, ``functional_call`` swapping tensors in:
  another object, so the full path again). Their dtype, shape and device can only change in place
  through ``module.to()``/``.double()``/... (``Module._apply``), which drops the plan;
- nothing around the call changed the answer: no ``use_backend`` context, the same
  ``BATCHNORM_BACKEND`` (read as a dictionary lookup, see :func:`batchnorm.backends.env_value`),
  not traced, compiled or exported, no ``__torch_function__`` mode.

What the plan runs is what the full path runs, bit for bit: ``torch.batch_norm`` (the op
``torch.nn.functional.batch_norm`` calls after its own checks, which the plan's signature has
passed), with the running statistics as :func:`batchnorm.functional._torch_native` gives them
(``.data`` aliases in training with a graph, private copies in eval with a graph), or
:func:`batchnorm.ops.cpu.batch_norm` for the C++ kernels.
"""

from __future__ import annotations

import torch

from batchnorm import backends
from batchnorm.functional import _ambiguous_layout, _torch_native
from batchnorm.modes import dual_level_active, functorch_active, mark_modified, records_graph

__all__ = ["CallPlan", "make_plan"]

# Parameters and buffers of these exact types only: a subclass may override __torch_function__,
# which torch.nn.functional.batch_norm would honour and a direct torch.batch_norm call would see
# under another name.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class CallPlan:
    """One checked call signature of a batch-norm layer, and how to run it (see the module doc)."""

    __slots__ = (
        "key", "weight", "bias", "running_mean", "running_var", "count", "mean_arg", "var_arg",
        "use_batch_stats", "factor", "cumulative", "eps", "one", "env", "kernel", "name",
        "ambiguous",
    )  # fmt: skip

    def admits(self, module: torch.nn.Module, input: torch.Tensor) -> bool:
        """Whether this call has the plan's signature (cheap: one tuple comparison and identity
        checks). The caller has checked that torch.compile is not tracing (Dynamo must not
        trace this)."""
        params, buffers = module._parameters, module._buffers
        return (
            type(input) is torch.Tensor
            and (
                input.shape,
                input.stride(),
                input.dtype,
                input.device,
                module.training,
                module.momentum,
                module.eps,
                module.track_running_stats,
                module.num_features,
                module.backend,
                module.nonfinite,
            )
            == self.key  # fmt: skip
            and params.get("weight") is self.weight
            and params.get("bias") is self.bias
            and buffers.get("running_mean") is self.running_mean
            and buffers.get("running_var") is self.running_var
            and buffers.get("num_batches_tracked") is self.count
            and backends.env_value() == self.env
            and not backends._local.stack
            and not torch._C._is_tracing()
            and not torch._C._is_torch_function_mode_enabled()
            and (self.kernel is None or not (functorch_active() or dual_level_active()))
        )

    def run(self, module: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
        """The call, as the full path would run it."""
        count = self.count
        if self.cumulative:
            # torch.nn: count += 1, then 1 / float(count); the same float (the CPU only).
            factor = 1.0 / (count.item() + 1)
        else:
            factor = self.factor
        weight, bias, mean, var = self.weight, self.bias, self.mean_arg, self.var_arg
        if self.kernel is not None:  # the C++ CPU kernels (backend "cpu")
            y = self.kernel(input, mean, var, weight, bias, self.use_batch_stats, factor, self.eps)
            return self._finish(module, y)
        if self.ambiguous and records_graph(input, weight, bias):
            # A dimension of one value: x and dy in one layout (functional._native_batch_norm).
            y = _torch_native(
                input, mean, var, weight, bias, self.use_batch_stats, factor, self.eps
            )
            return self._finish(module, y)
        if (
            mean is not None
            and torch.is_grad_enabled()
            and (
                input.requires_grad
                or (weight is not None and weight.requires_grad)
                or (bias is not None and bias.requires_grad)
            )
        ):
            if self.use_batch_stats and not functorch_active():
                # The training backward reads only the saved batch statistics: aliases with
                # their own version counter (see functional._torch_native).
                y = torch.batch_norm(
                    input, weight, bias, mean.data, var.data, True, factor, self.eps,
                    torch._C._get_cudnn_enabled(),
                )  # fmt: skip
                mark_modified(mean, var)
                return self._finish(module, y)
            y = _torch_native(
                input, mean, var, weight, bias, self.use_batch_stats, factor, self.eps
            )
            return self._finish(module, y)
        y = torch.batch_norm(
            input, weight, bias, mean, var, self.use_batch_stats, factor, self.eps,
            torch._C._get_cudnn_enabled(),
        )  # fmt: skip
        return self._finish(module, y)

    def _finish(self, module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        if self.one is not None:
            self.count.add_(self.one)  # a tensor operand: cheaper than add_(1), the same count
        backends._local.last = self.name
        module.__dict__["last_backend"] = self.name
        return y


def make_plan(module: torch.nn.Module, input: torch.Tensor, ran: str) -> CallPlan | None:
    """The plan of a call that just took the full path and ran backend ``ran``, or None where
    the fast path does not apply (then every such call takes the full path).

    Covered: PyTorch's kernel ("torch") or the C++ CPU kernels ("cpu"), whose choice depends
    only on what the key holds (the request, the input's device and dtype; the kernels stay
    loaded once built); a plain tensor with values, the "propagate" policy, no backend or the
    backend that ran asked for (``backend="torch"`` gives PyTorch's kernel whatever the context,
    eps=0 aside), a float
    momentum (or the cumulative average on the CPU), parameters and buffers of plain types that
    are what the layer's attributes give (no parametrization), outside torch.compile/export,
    tracing and ``__torch_function__`` modes.
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or torch._C._is_torch_function_mode_enabled()
        or type(input) is not torch.Tensor
        or module.nonfinite != "propagate"
        or ran not in ("torch", "cpu")
        or (module.backend is not None and module.backend.strip().lower() != ran)
        or backends._local.stack
        or input.dim() < 2
        or input.numel() == 0
        or (module.momentum is None and input.device.type != "cpu")
    ):
        return None
    params, buffers = module._parameters, module._buffers
    tensors = {
        "weight": params.get("weight"),
        "bias": params.get("bias"),
        "running_mean": buffers.get("running_mean"),
        "running_var": buffers.get("running_var"),
        "num_batches_tracked": buffers.get("num_batches_tracked"),
    }
    for name, tensor in tensors.items():
        if getattr(module, name) is not tensor:
            return None  # a parametrization or an attribute standing in for the registered one
        if tensor is not None and type(tensor) not in _PLAIN_TYPES:
            return None
    plan = CallPlan()
    plan.key = (
        input.shape, input.stride(), input.dtype, input.device, module.training, module.momentum,
        module.eps, module.track_running_stats, module.num_features, module.backend,
        module.nonfinite,
    )  # fmt: skip
    plan.weight, plan.bias = tensors["weight"], tensors["bias"]
    plan.running_mean, plan.running_var = tensors["running_mean"], tensors["running_var"]
    plan.count = tensors["num_batches_tracked"]
    training = module.training
    keep_stats = not training or module.track_running_stats
    plan.mean_arg = plan.running_mean if keep_stats else None
    plan.var_arg = plan.running_var if keep_stats else None
    plan.use_batch_stats = training or (plan.running_mean is None and plan.running_var is None)
    track = training and module.track_running_stats and plan.count is not None
    plan.cumulative = module.momentum is None and track
    plan.factor = 0.0 if module.momentum is None else module.momentum
    plan.eps = module.eps
    plan.one = torch.ones((), dtype=plan.count.dtype, device=plan.count.device) if track else None
    plan.env = backends.env_value()
    plan.name = ran
    plan.kernel = None
    plan.ambiguous = ran == "torch" and _ambiguous_layout(input) is not None
    if ran == "cpu":
        from batchnorm.ops import cpu

        # A Python function, not the extension's entry itself: the plan travels with the module
        # through copy.deepcopy and pickle, which cannot name a compiled extension's function.
        plan.kernel = cpu.batch_norm
    return plan
