"""The CPU backend: the compiled kernels of :mod:`megamlm.ops.cpu_kernels` (and CPU-tuned torch code
where they cannot be built), op by op. Each op checks that it can serve the call (CPU tensors, float32 /
float64, no autocast, not under ``torch.compile``, parameters materialised rather than ZeRO-3 partitioned
where it reads them outside their module) and otherwise runs the torch backend's op: the fallback is
per op, inside this layer, never in the model.

What it fuses (measured on the bench model; each op's docstring says how):

* dropout: the mask generated in the kernel from a seed, regenerated in backward (never stored), and
  ``residual + dropout(x)`` in one pass (:mod:`megamlm.ops.cpu_dropout`);
* attention with dropout straight from the fused qkv projection (:class:`~megamlm.ops.cpu_functions.TileAttention`);
* the feed-forward's bias + GELU after the gemm, and the post-LN ``LayerNorm(r + dropout(x + b))`` with
  the projection's bias folded in;
* the tied vocabulary: the training logits in a reused workspace, the decoder's bias added inside the
  loss, and the tied weight's two gradients summed without an extra [V, H] pass (a
  :class:`~megamlm.ops.cpu_functions.TiedGrad` handed from the decoder's backward to the lookup's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamlm.ops import cpu_dropout, cpu_kernels
from megamlm.ops.cpu_functions import (BiasGelu, CPUAttention, LinearInWorkspace, ResidualLayerNorm,
                                       SegmentTileAttention, TiedGrad, TiedLookup, TileAttention, Workspace,
                                       attention_with_dropout)
from megamlm.ops.cross_entropy import IGNORE_INDEX
from megamlm.ops.modules import zero3_partitioned
from megamlm.ops.torch_ops import TorchOps, _rows, check_segment_call

__all__ = ["CpuOps"]

_FLOATS = (torch.float32, torch.float64)


def _plain_cpu(x: torch.Tensor) -> bool:
    """A CPU float32/float64 tensor outside autocast, scripting and compilation: what the kernels take."""
    return (x.device.type == "cpu" and x.dtype in _FLOATS and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling())


def _scratch_fits(w: torch.Tensor) -> bool:
    """The training logits can live in the workspace (CPU float32, no autocast, not compiling)."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def _norm_fusable(norm, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``LayerNorm(r + dropout(x + bias))`` can be one kernel for ``x``, decided before the
    projection runs: the norm's parameters materialised here (a ZeRO-3 partitioned one has no elements
    outside its module's call), and ``bias``, read outside its own module's call, not a ZeRO-3 parameter
    at all (it may be released between that call and this one)."""
    H = norm.normalized_shape[-1]
    return (len(norm.normalized_shape) == 1 and norm.elementwise_affine and norm.bias is not None
            and _plain_cpu(x) and norm.weight.dtype == x.dtype and norm.weight.numel() == H
            and norm.bias.numel() == H
            and (bias is None or (bias.numel() == H and bias.dtype == x.dtype and not zero3_partitioned(bias)))
            and cpu_kernels.available())


class CpuOps(TorchOps):
    """The compiled CPU kernels where they serve the call, the torch backend's op elsewhere."""

    name = "cpu"
    kernels = True  # the cross-entropy takes the compiled kernel where it fits

    def __init__(self):
        self.workspace = Workspace()  # the training logits (see decoder_cross_entropy)
        self._pending: tuple[torch.Tensor, TiedGrad] | None = None  # the last lookup's hand-off (weight, tied)

    def describe(self) -> str:
        if not cpu_kernels.available():
            return f"cpu (compiled kernels unavailable: {cpu_kernels.unavailable_reason()}; CPU-tuned torch fallbacks)"
        n = torch.get_num_threads()
        threads = f"{n} OpenMP thread{'s' if n != 1 else ''}" if cpu_kernels.uses_openmp() else "serial"
        tile = "" if cpu_kernels.attention_available() else "; no tile attention (torch exports no sgemm)"
        return f"cpu (compiled, {threads}{tile})"

    # ------------------------------------------------------------------ elementwise
    def dropout(self, x, p, training):
        """The kernel's mask from a seed (nothing stored), or a numpy-drawn float mask without kernels."""
        return cpu_dropout.dropout(x, p, training)

    def dropout_add(self, x, residual, p, training):
        """``residual + dropout(x)`` in one kernel pass."""
        return cpu_dropout.dropout_add(x, residual, p, training)

    # ------------------------------------------------------------------ block pieces
    def linear_act(self, linear, x, activation):
        """The gemm without bias, then bias + exact GELU (and its derivative, for backward) in one pass,
        inside the linear's call."""
        if (activation == "gelu" and _plain_cpu(x) and x.dtype == linear.weight.dtype and cpu_kernels.available()):
            return linear(x, inside=_bias_gelu)
        return super().linear_act(linear, x, activation)

    def attention(self, qkv, x, num_heads, attn_mask, p, segments=None):
        """With dropout on CPU (SDPA's CPU kernels have none: it would take the math path with bernoulli_):
        float32 → the tile kernel (the qkv bias applied per tile; the gemm leaves it out), float64 or no
        tile kernel → :class:`CPUAttention`, autocast / bf16 → the formula with the CPU dropout. Without
        dropout (eval), or elsewhere: SDPA. With ``segments``: see :meth:`segment_attention`."""
        if segments is not None:
            return self.segment_attention(qkv, x, num_heads, attn_mask, p, segments)
        B, T, H = x.shape
        if not (p > 0.0 and x.device.type == "cpu" and not torch.compiler.is_compiling()):
            return super().attention(qkv, x, num_heads, attn_mask, p)
        if x.dtype in _FLOATS and not torch.is_autocast_enabled("cpu"):
            mask_add = None
            if attn_mask is not None:  # [B, 1, 1, T] bool → [B, 1, T] additive
                mask_add = torch.zeros(B, 1, T, dtype=x.dtype).masked_fill_(~attn_mask[:, 0], float("-inf"))
            if x.dtype == torch.float32 and qkv.weight.dtype == x.dtype and cpu_kernels.attention_available():
                # the bias goes to the kernel, unless ZeRO-3 manages it (then only the qkv call may read it)
                bias = qkv.bias
                fold = bias is not None and bias.dtype == x.dtype and not zero3_partitioned(bias)
                y = qkv(x, inside=_linear_without_bias if fold else None).contiguous()  # [B, T, 3H]
                return TileAttention.apply(y, bias if fold else None,
                                           None if mask_add is None else mask_add.view(B, T), num_heads, p)
            return CPUAttention.apply(qkv(x), mask_add, num_heads, p)  # [B, T, H]
        q, k, v = qkv(x).view(B, T, 3, num_heads, H // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return attention_with_dropout(q, k, v, attn_mask, p).transpose(1, 2).reshape(B, T, H)  # [B, T, H]

    def segment_attention(self, qkv, x, num_heads, attn_mask, p, segments):
        """Packed attention on CPU, float32, with the tile kernel (dropout or not): one tile per (segment,
        head) over the segment's own rows (:class:`SegmentTileAttention`; nothing computed for padding,
        the qkv bias applied per tile). Anything else (float64, autocast, compiling, no kernels, another
        device): the torch backend's padded-layout op."""
        check_segment_call(x, attn_mask, segments)
        cu = segments.cu_seqlens
        if (_plain_cpu(x) and x.dtype == torch.float32 and qkv.weight.dtype == x.dtype and cu.device.type == "cpu"
                and cpu_kernels.attention_available()):
            bias = qkv.bias
            fold = bias is not None and bias.dtype == x.dtype and not zero3_partitioned(bias)
            y = qkv(x, inside=_linear_without_bias if fold else None)[0].contiguous()  # [N, 3H]
            out = SegmentTileAttention.apply(y, bias if fold else None, cu, segments.max_seqlen, num_heads, p)
            return out.unsqueeze(0)  # [1, N, H]
        return super().segment_attention(qkv, x, num_heads, attn_mask, p, segments)

    def projection_residual_norm(self, linear, x, residual, norm, p, training):
        """``norm(residual + dropout(linear(x)))`` as one kernel pass forward and one backward: the
        projection's gemm leaves its bias to the kernel, the mask comes from a seed."""
        q = p if training else 0.0
        bias = linear.bias
        if q < 1.0 and _norm_fusable(norm, residual, bias):
            h = linear(x, inside=_linear_without_bias)  # [.., H]
            return norm(h, inside=lambda m, h: ResidualLayerNorm.apply(h.contiguous(), bias, residual.contiguous(),
                                                                       m.weight, m.bias, m.eps, q))
        return super().projection_residual_norm(linear, x, residual, norm, p, training)

    # ------------------------------------------------------------------ vocabulary
    def embedding(self, table, ids):
        """A training lookup of a CPU float32 table whose weight a decoder shares (``weight.tied_decoder``,
        set by :class:`~megamlm.model.heads.TiedDecoder`) registers a :class:`TiedGrad`: the decoder of the
        same forward (:meth:`decoder_cross_entropy`) leaves its gradient there and the lookup's backward
        adds its rows into it: one [V, H] gradient, not two summed. Any other lookup clears the hand-off."""
        w = table.weight
        self._pending = None
        if (getattr(w, "tied_decoder", False) and torch.is_grad_enabled() and w.requires_grad and _scratch_fits(w)
                and not zero3_partitioned(w) and table.padding_idx is None and table.max_norm is None
                and not table.sparse):
            tied = TiedGrad()
            self._pending = (w, tied)
            return table(ids, inside=lambda m, ids: TiedLookup.apply(ids, m.weight, tied))  # [B, T, H]
        return table(ids)

    def decoder_cross_entropy(self, h, weight, bias, n_predicted, labels, ignore_index=IGNORE_INDEX, peek=None):
        """CPU float32: the logits [N, V_real] written into :attr:`workspace` (reused step after step: a
        fresh tensor that large is page-faulted in anew each time), without the bias when the loss can add
        it chunk by chunk (no broadcast copy into N·V logits, no column-sum pass in backward), and with the
        tied weight's gradient handed to the lookup of the same forward (see :meth:`embedding`)."""
        pending, self._pending = self._pending, None
        if not (h.dtype == torch.float32 and _scratch_fits(weight)):
            return super().decoder_cross_entropy(h, weight, bias, n_predicted, labels, ignore_index, peek)
        tied = None
        if pending is not None and pending[0] is weight and torch.is_grad_enabled() and not zero3_partitioned(weight):
            tied = pending[1]  # the lookup of this forward, over this very weight
        w, b = _rows(weight, bias, n_predicted)
        in_loss = b is not None and bias.numel() == weight.shape[0] and not zero3_partitioned(bias)
        logits = LinearInWorkspace.apply(h, w, None if in_loss else b, self.workspace, weight.shape[0], tied)
        if peek is not None:
            with torch.no_grad():
                peek(logits.detach(), b if in_loss else None)
        return self.cross_entropy(logits, labels, ignore_index, inplace_backward=True, with_argmax=True,
                                  bias=b if in_loss else None)


def _linear_without_bias(m, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight)


def _bias_gelu(m, x: torch.Tensor) -> torch.Tensor:
    return BiasGelu.apply(F.linear(x, m.weight), m.bias)
