"""The torch backend: every op in plain PyTorch. The reference the other backends are tested against,
and what runs on CUDA (eager: SDPA picks flash / memory-efficient kernels) and under ``torch.compile``.
The contracts are in :mod:`megamlm.ops`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamlm.ops.cross_entropy import IGNORE_INDEX, cross_entropy

__all__ = ["TorchOps", "activation_fn"]


def activation_fn(name: str):
    """``gelu`` = exact erf GELU (BERT, HF ``"gelu"``); ``gelu_tanh`` = tanh approximation."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"activation={name!r} is not supported; choose 'gelu' or 'gelu_tanh'")


class TorchOps:
    """Plain PyTorch ops (see :mod:`megamlm.ops` for each contract)."""

    name = "torch"
    kernels = False  # the cross-entropy never takes the compiled CPU kernel

    def describe(self) -> str:
        return "torch"

    def __repr__(self) -> str:
        return f"<megamlm ops: {self.name}>"

    # ------------------------------------------------------------------ elementwise
    def dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        if not training or p == 0.0:
            return x
        return F.dropout(x, p, True)

    def dropout_add(self, x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        return residual + self.dropout(x, p, training)

    # ------------------------------------------------------------------ block pieces
    def linear_act(self, linear, x: torch.Tensor, activation: str) -> torch.Tensor:
        return activation_fn(activation)(linear(x))

    def attention(self, qkv, x: torch.Tensor, num_heads: int, attn_mask: torch.Tensor | None,
                  p: float) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = qkv(x).view(B, T, 3, num_heads, H // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # each [B, nh, T, hd] (strided views)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # [B, nh, T, hd]
        return y.transpose(1, 2).reshape(B, T, H)  # [B, T, H]

    def projection_residual_norm(self, linear, x: torch.Tensor, residual: torch.Tensor, norm, p: float,
                                 training: bool) -> torch.Tensor:
        return norm(self.dropout_add(linear(x), residual, p, training))

    # ------------------------------------------------------------------ vocabulary
    def embedding(self, table, ids: torch.Tensor) -> torch.Tensor:
        return table(ids)

    def decoder_cross_entropy(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              n_predicted: int, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
        w, b = _rows(weight, bias, n_predicted)
        logits = F.linear(h, w, b)  # [N, V_real], for the loss alone
        return self.cross_entropy(logits, labels, ignore_index, inplace_backward=True, with_argmax=True)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      inplace_backward: bool = False, with_argmax: bool = False, bias: torch.Tensor | None = None):
        return cross_entropy(logits, labels, ignore_index, inplace_backward, with_argmax, bias, kernels=self.kernels)


def _rows(weight: torch.Tensor, bias: torch.Tensor | None, n: int):
    """The predicted rows [n, H], [n] of the decoder's weight and bias: contiguous row slices, no copy."""
    if n == weight.shape[0]:
        return weight, bias
    return weight[:n], None if bias is None else bias[:n]
