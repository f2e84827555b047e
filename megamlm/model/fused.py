"""Fused CPU paths of a transformer block: the feed-forward's ``gelu(x Wᵀ + b)`` (:class:`LinearGelu`)
and the post-LN residual ``LayerNorm(r + dropout(x Wᵀ + b))`` (:class:`ResidualLayerNorm`), each one
kernel pass forward and one backward.

``nn.Linear`` + ``F.gelu`` on CPU costs the bias twice per step: ``addmm`` first copies the bias into
every row of the [tokens, ffn] output (and the gemm then reads it back), and the backward sums the
output gradient over rows in a separate pass. :class:`LinearGelu` runs the gemm without bias and
hands ``(x Wᵀ, b)`` to :func:`megamlm.model.cpu_kernels.bias_gelu`, which also writes the GELU
derivative (one exp shared by erf and the density); the backward multiplies by it and returns the
bias gradient from the same pass. Elsewhere (accelerators, other dtypes, autocast, ``torch.compile``, no C compiler) it is
exactly ``act(linear(x))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamlm.model import cpu_kernels

__all__ = ["LinearGelu", "ResidualLayerNorm", "Linear", "zero3_partitioned"]


def zero3_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a parameter DeepSpeed ZeRO-3 manages (gathered only inside its module's call)."""
    return hasattr(p, "ds_id")


class _BiasGelu(torch.autograd.Function):
    """gelu(a + bias); saves gelu'(a + bias) from the same kernel pass (not ``a``: the backward is a
    multiply, without a second erf and exp)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out, deriv = cpu_kernels.bias_gelu(a, bias, derivative=True)
        ctx.save_for_backward(deriv)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (deriv,) = ctx.saved_tensors
        grad_a, grad_bias = cpu_kernels.mul_colsum(grad.contiguous(), deriv, colsum=ctx.has_bias and ctx.needs_input_grad[1])
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


class _ResidualLayerNorm(torch.autograd.Function):
    """LayerNorm(residual + dropout(x + bias)) by :func:`cpu_kernels.residual_layer_norm`; saved for
    backward: z, the row mean and rstd, and the mask's seed (not the mask)."""

    @staticmethod
    def forward(ctx, x, bias, residual, weight, norm_bias, eps: float, p: float):
        seed = cpu_kernels.draw_seed() if p > 0.0 else 0
        y, z, mean, rstd = cpu_kernels.residual_layer_norm(x, bias, residual, weight, norm_bias, eps, p, seed)
        ctx.save_for_backward(z, mean, rstd, weight)
        ctx.p, ctx.seed, ctx.has_bias = p, seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, mean, rstd, weight = ctx.saved_tensors
        need_bias = ctx.has_bias and ctx.needs_input_grad[1]
        grad_z, grad_x, grad_w, grad_nb, grad_b = cpu_kernels.residual_layer_norm_backward(
            grad_y.contiguous(), z, mean, rstd, weight, ctx.p, ctx.seed, bias_grad=need_bias)
        return grad_x, grad_b, grad_z, grad_w, grad_nb, None, None


class ResidualLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) that can also take the post-LN residual branch:
    ``forward(x, residual, bias, p)`` = ``LayerNorm(residual + dropout_p(x + bias))``, one CPU kernel pass
    forward and one backward (the dropout mask regenerated from a seed) where :meth:`fusable`;
    ``forward(x)`` is the plain LayerNorm. ``bias`` is the preceding projection's bias, which that
    projection then leaves out (:class:`Linear` with ``add_bias=False``)."""

    def fusable(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether the fused path applies to ``x`` (decided before the projection runs). Parameters must
        be materialised here (a ZeRO-3 partitioned one has no elements outside its module's call), and
        ``bias``, used outside its own module's call, must not be a ZeRO-3 parameter at all (it may be
        released between that call and this one)."""
        H = self.normalized_shape[-1]
        return (len(self.normalized_shape) == 1 and self.elementwise_affine and self.bias is not None
                and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and self.weight.dtype == x.dtype and self.weight.numel() == H and self.bias.numel() == H
                and (bias is None or (bias.numel() == H and bias.dtype == x.dtype and not zero3_partitioned(bias)))
                and not torch.is_autocast_enabled("cpu") and not torch.jit.is_scripting()
                and not torch.compiler.is_compiling() and cpu_kernels.available())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                p: float = 0.0) -> torch.Tensor:
        if residual is None:
            return super().forward(x)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        return _ResidualLayerNorm.apply(x.contiguous(), bias, residual.contiguous(), self.weight, self.bias,
                                        self.eps, p)


class Linear(nn.Linear):
    """``nn.Linear`` whose call can leave the bias out (``add_bias=False``: a fused consumer adds it),
    inside the module's own call (so ZeRO-3 gathers the weight for it)."""

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if add_bias else None)
