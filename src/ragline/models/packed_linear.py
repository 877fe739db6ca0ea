"""Linear layers that run on weights laid out once for oneDNN, for CPU inference.

``torch.nn.functional.linear`` lays a bf16 weight out for oneDNN's kernels on every call, and runs fp32 through
the BLAS torch was built with (MKL, which takes slow code paths on some CPUs, AMD's among them). Decoding calls
each layer with a handful of rows, where that per-call work is a large share: on this project's 2-core AMD
machine a (20 x 896) @ Qwen2.5-0.5B's output layer takes 18 ms in bf16 and 75 ms in fp32 through ``linear``,
and 9 ms and 17 ms on a weight laid out beforehand (``benchmarks/latency.py`` measures whole answers).

:func:`pack_linears` turns a model's ``nn.Linear`` layers into :class:`PackedLinear` in place (the same module
with the same parameters, state dict and saved form). Without gradient, on the CPU, a layer computes
``y = x W^T + b`` with oneDNN on a copy of ``W`` laid out for it, made on first use and made again whenever
``W`` changes (an optimiser step, a loaded state dict); with gradient, under autocast, or on another device
or dtype, it is ``torch.nn.functional.linear``. bf16 results are bit for bit those of ``linear`` (the same
oneDNN kernel); fp32 ones differ from MKL's by float rounding (a different summation order, about 1e-6
relative). The copies cost the weights' memory once more.
"""

from __future__ import annotations

import torch


def available() -> bool:
    """Whether this torch has oneDNN's packed linear operators for the CPU."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(torch.nn.Linear):
    """``nn.Linear`` whose inference on the CPU reads a oneDNN-laid-out copy of its weight (module docstring)."""

    _packed: torch.Tensor | None = None
    _packed_for: tuple[int, int, torch.dtype] | None = None  # (data_ptr, _version, dtype) of the weight it copies
    _unsupported = False  # oneDNN refused this layer once: it stays plain linear

    def __getstate__(self) -> dict:
        """Copies and pickles leave the laid-out weight behind (it is made again on first use)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_packed_for")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) or x.device.type != "cpu" \
                or x.dtype != w.dtype or w.dtype not in (torch.float32, torch.bfloat16) or x.dim() < 2 \
                or torch.is_autocast_enabled("cpu") or self._unsupported:  # autocast picks its own dtype
            return torch.nn.functional.linear(x, w, self.bias)
        stamp = (w.data_ptr(), w._version, w.dtype)
        bias = None if self.bias is None else self.bias.detach()
        try:
            if self._packed_for != stamp:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
                self._packed_for = stamp
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")  # (..., out_features)
        except RuntimeError:  # a oneDNN build without this layout or dtype (some non-x86 CPUs)
            self._unsupported, self._packed, self._packed_for = True, None, None
            return torch.nn.functional.linear(x, w, self.bias)


def pack_linears(model: torch.nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`PackedLinear` (in place); returns how many. Does
    nothing where oneDNN is missing. Quantised layers and other subclasses are left as they are."""
    if not available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = PackedLinear
            n += 1
    return n
