"""The torch backend: every op in plain PyTorch. The reference the other backends are tested against,
and what runs on CUDA (eager: SDPA picks flash / memory-efficient kernels) and under ``torch.compile``.
The contracts are in :mod:`megamlm.ops`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamlm.ops.cross_entropy import IGNORE_INDEX, cross_entropy

__all__ = ["TorchOps", "activation_fn", "check_segment_call", "padded_index", "padded_layout", "Relayout",
           "varlen_inputs"]

try:  # torch >= 2.11: flash attention over packed sequences (CUDA, fp16 / bf16, no dropout)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # older torch
    _varlen_attn = None


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
                  p: float, segments=None) -> torch.Tensor:
        if segments is not None:
            return self.segment_attention(qkv, x, num_heads, attn_mask, p, segments)
        B, T, H = x.shape
        q, k, v = qkv(x).view(B, T, 3, num_heads, H // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # each [B, nh, T, hd] (strided views)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # [B, nh, T, hd]
        return y.transpose(1, 2).reshape(B, T, H)  # [B, T, H]

    def segment_attention(self, qkv, x: torch.Tensor, num_heads: int, attn_mask, p: float, segments) -> torch.Tensor:
        """Packed attention, x [1, N, H] (see the contract). CUDA, fp16 / bf16, p = 0, and a torch with
        ``varlen_attn``: flash attention over the packed rows. Elsewhere: q, k, v gathered by one index
        into a padded [E, nh, max_seqlen, hd] layout (a view, without a gather, when every segment has
        max_seqlen tokens), SDPA with a key-padding mask (BERT's attention dropout kept), and the real
        rows gathered back to [1, N, H]; padded rows cost compute but never reach a real one."""
        N, H = check_segment_call(x, attn_mask, segments)
        nh, hd = num_heads, H // num_heads
        rows = qkv(x)[0]  # [N, 3H]
        if (_varlen_attn is not None and x.device.type == "cuda" and p == 0.0
                and rows.dtype in (torch.float16, torch.bfloat16)):
            # Not run by the test suite (no CUDA there): kept to this call; its inputs are varlen_inputs'.
            q, k, v, cu, m = varlen_inputs(rows, segments, nh)
            return _varlen_attn(q, k, v, cu, cu, m, m).reshape(1, N, H)  # [N, nh, hd] → [1, N, H]
        E, L = segments.num_segments, segments.max_seqlen
        if E * L == N:  # every segment is max_seqlen long: the padded layout is the stream itself
            padded, mask, back = rows.view(E, L, 3 * H), None, None
        else:
            gather, mask, back, keep = padded_layout(segments, N, rows.dtype)
            padded = Relayout.apply(rows, gather, back, None).view(E, L, 3 * H)
        q, k, v = padded.view(E, L, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each [E, nh, L, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [E, nh, L, hd]
        y = y.transpose(1, 2).reshape(E * L, H)  # [E·L, H]
        return (y if back is None else Relayout.apply(y, back, gather, keep)).view(1, N, H)

    def projection_residual_norm(self, linear, x: torch.Tensor, residual: torch.Tensor, norm, p: float,
                                 training: bool) -> torch.Tensor:
        return norm(self.dropout_add(linear(x), residual, p, training))

    # ------------------------------------------------------------------ vocabulary
    def embedding(self, table, ids: torch.Tensor) -> torch.Tensor:
        return table(ids)

    def decoder_cross_entropy(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              n_predicted: int, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                              peek=None):
        w, b = _rows(weight, bias, n_predicted)
        logits = F.linear(h, w, b)  # [N, V_real], for the loss (and the peek) alone
        if peek is not None:
            with torch.no_grad():
                peek(logits.detach(), None)
        return self.cross_entropy(logits, labels, ignore_index, inplace_backward=True, with_argmax=True)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      inplace_backward: bool = False, with_argmax: bool = False, bias: torch.Tensor | None = None):
        return cross_entropy(logits, labels, ignore_index, inplace_backward, with_argmax, bias, kernels=self.kernels)


def _rows(weight: torch.Tensor, bias: torch.Tensor | None, n: int):
    """The predicted rows [n, H], [n] of the decoder's weight and bias: contiguous row slices, no copy."""
    if n == weight.shape[0]:
        return weight, bias
    return weight[:n], None if bias is None else bias[:n]


def check_segment_call(x: torch.Tensor, attn_mask, segments) -> tuple[int, int]:
    """(N, H) of a packed attention call; ValueError for a mask or a shape that is not [1, N, H]."""
    if attn_mask is not None:
        raise ValueError("attention with segments takes no attn_mask: the segments are the mask")
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"attention with segments takes x [1, N, H] (one packed stream), got {tuple(x.shape)}")
    return x.shape[1], x.shape[2]


def padded_layout(segments, n_tokens: int, dtype: torch.dtype):
    """(gather, additive key mask [E, 1, 1, L] in ``dtype``: 0 on real keys, -inf on padding, back, keep
    [E·L, 1] in ``dtype``: 1 on real slots) of :func:`padded_index`, built once per micro-batch and kept in
    ``segments.cache`` for the other layers (eager: about 15 kernels fewer per layer; under torch.compile
    built in the graph, which fuses it)."""
    key = ("padded", n_tokens, dtype)
    hit = None if torch.compiler.is_compiling() else segments.cache.get(key)
    if hit is None:
        gather, valid, back = padded_index(segments, n_tokens)
        mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
        hit = gather, mask[:, None, None, :], back, valid.reshape(-1, 1).to(dtype)
        if not torch.compiler.is_compiling():
            segments.cache[key] = hit
    return hit


class Relayout(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is the inverse move ``grad.index_select(0, inverse)``
    (times ``keep`` [rows of x, 1], 0 where a row of x is no output's source): the packed stream to the
    padded layout (index ``gather``, inverse ``back``) and back (index ``back``, inverse ``gather``, keep the
    real slots). Exact: every real token sits in exactly one slot, and the padding slots' gradients are
    exactly 0 (masked keys get probability 0, padded queries a zero output gradient), so what autograd's
    backward would add into row 0 from them is 0. Both directions are gathers: no ``index_add`` (on a GPU
    its bf16 atomics on the padding slots' one row cost 16% of a BERT-base step, H200, 2026-12-04)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, keep: torch.Tensor | None):
        ctx.save_for_backward(inverse, keep)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inverse, keep = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        return (g if keep is None else g.mul_(keep)), None, None, None


def padded_index(segments, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index of the padded layout, built from ``cu_seqlens`` without a loop over segments (and
    without a device sync): (gather [E·L] int64, the stream row of padded slot (e, j), a real one
    (row 0) for padding slots; valid [E, L] bool, True on real slots; back [N] int64, each token's slot
    e·L + j). L = max_seqlen."""
    cu = segments.cu_seqlens.long()
    E, L = segments.num_segments, segments.max_seqlen
    j = torch.arange(L, device=cu.device)  # [L]
    valid = j[None, :] < (cu[1:] - cu[:-1])[:, None]  # [E, L]
    gather = torch.where(valid, cu[:-1, None] + j[None, :], 0).reshape(E * L)
    seg = segments.segment_ids(n_tokens)  # [N]
    back = seg * L + (torch.arange(n_tokens, device=cu.device) - cu[seg])
    return gather, valid, back


def varlen_inputs(rows: torch.Tensor, segments, num_heads: int):
    """(q, k, v [N, nh, hd] contiguous, cu_seqlens int32 on rows' device, max_seqlen) for
    ``varlen_attn`` from the fused projection's rows [N, 3H] (columns q | k | v, each nh × hd)."""
    N, H3 = rows.shape
    q, k, v = rows.view(N, 3, num_heads, H3 // (3 * num_heads)).unbind(1)  # strided [N, nh, hd]
    cu = segments.cu_seqlens.to(device=rows.device, dtype=torch.int32)
    return q.contiguous(), k.contiguous(), v.contiguous(), cu, segments.max_seqlen
