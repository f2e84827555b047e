"""The feed-forward's ``gelu(x Wᵀ + b)`` with the bias and the activation in one CPU kernel pass.

``nn.Linear`` + ``F.gelu`` on CPU costs the bias twice per step: ``addmm`` first copies the bias into
every row of the [tokens, ffn] output (and the gemm then reads it back), and the backward sums the
output gradient over rows in a separate pass. :class:`LinearGelu` runs the gemm without bias and
hands ``(x Wᵀ, b)`` to :func:`megamlm.model.cpu_kernels.bias_gelu`, whose backward returns the bias
gradient from the same pass that computes the GELU derivative (one exp shared by erf and the
density). Elsewhere (accelerators, other dtypes, autocast, ``torch.compile``, no C compiler) it is
exactly ``act(linear(x))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamlm.model import cpu_kernels

__all__ = ["LinearGelu"]


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(a, bias)
        return cpu_kernels.bias_gelu(a, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, bias = ctx.saved_tensors
        need_bias = bias is not None and ctx.needs_input_grad[1]
        grad_a, grad_bias = cpu_kernels.bias_gelu_backward(grad.contiguous(), a, bias, bias_grad=need_bias)
        return grad_a, grad_bias


class LinearGelu(nn.Linear):
    """``act(x Wᵀ + b)``: an ``nn.Linear`` (same parameters and state-dict keys) that also applies its
    activation, so the fused CPU path runs inside the module's own call (ZeRO-3 gathers the weight and
    bias per module call)."""

    def __init__(self, in_features: int, out_features: int, activation: str):
        from megamlm.model.encoder import activation_fn  # (encoder imports this module)

        super().__init__(in_features, out_features)
        self.activation = activation
        self.act = activation_fn(activation)

    def _fused(self, x: torch.Tensor) -> bool:
        return (self.activation == "gelu" and x.device.type == "cpu" and x.dtype == self.weight.dtype
                and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and not torch.jit.is_scripting() and not torch.compiler.is_compiling() and cpu_kernels.available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return _BiasGelu.apply(F.linear(x, self.weight), self.bias)  # [..., out]
        return self.act(super().forward(x))
