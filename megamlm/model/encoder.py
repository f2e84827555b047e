"""The BERT encoder for one device, in plain PyTorch: embeddings → N blocks → hidden [B, T, H].

Reads top-down: :class:`Embeddings`, :class:`SelfAttention`, :class:`FeedForward`, :class:`Block`,
:class:`Encoder`. The encoder knows nothing of MLM, NSP or SOP; heads live in ``heads.py``.

* Post-LN (BERT) by default, pre-LN with ``norm_position="pre"`` (then a final LayerNorm closes the
  stack).
* Attention goes through ``F.scaled_dot_product_attention`` so GPUs get flash / memory-efficient
  kernels. Q, K and V come from one fused ``qkv`` linear ([3H, H], rows ordered q, k, v: the HF
  conversion table splits it into query / key / value). CPU training with attention dropout (no SDPA
  kernel has it) takes :class:`_TileAttention` instead (float32: the compiled kernel, one cached
  (head, sequence) tile at a time on each thread), else :class:`_CPUAttention` (head-by-head gemms on
  strided views of the qkv output); both read q, k, v in place and have a hand-written backward.
* Dropout comes from ``dropout.py``: on CPU a compiled kernel generates the mask from a seed (nothing
  stored for backward). CPU kernels also fuse (``fused.py``) the feed-forward's bias + GELU and, in
  post-LN blocks, ``LayerNorm(x + dropout(f(x) + bias))`` with the projection's bias folded in.
* The padding mask is passed to SDPA only when the batch may contain padding; ``attention_mask=None``
  means "every position is real" and lets SDPA take its fastest path (see
  :meth:`Encoder.forward`).
* No tensor parallelism in here: ``embeddings.word_embeddings`` is a plain ``nn.Embedding`` attribute
  that a parallelize function can swap on a finished model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamlm.model import cpu_kernels
from megamlm.model.dropout import Dropout, _keep_mask, dropout, dropout_add
from megamlm.model.fused import Linear, LinearGelu, ResidualLayerNorm, zero3_partitioned

__all__ = ["Dropout", "TiedGrad", "WordEmbedding", "Embeddings", "SelfAttention", "FeedForward", "Block", "Encoder", "init_bert_weights",
           "activation_fn", "check_model_inputs"]


def activation_fn(name: str):
    """``gelu`` = exact erf GELU (BERT, HF ``"gelu"``); ``gelu_tanh`` = tanh approximation."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"activation={name!r} is not supported; choose 'gelu' or 'gelu_tanh'")


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation: linear and embedding weights ~ N(0, std), biases 0, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TiedGrad:
    """Carries the tied decoder's weight gradient to the word-embedding lookup of the same forward.

    The tied weight [V, H] gets two gradients: the decoder's dense one and the lookup's B·T rows.
    Left to autograd, the lookup's is a zeroed [V, H] (filled, scattered into) and the two are summed:
    three more passes over V·H per step (~15 ms of a 550 ms step for the bench model on CPU). With a
    ``TiedGrad``, the decoder's backward leaves its gradient here instead of returning it, and the
    lookup's backward (which autograd runs after it: the decoder consumes what the lookup produced)
    adds its rows into that tensor and returns the sum as the weight's only gradient."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: torch.Tensor | None = None


class _TiedLookup(torch.autograd.Function):
    """``F.embedding(ids, weight)``; backward returns the decoder's gradient left in ``tied`` (or zeros)
    plus the looked-up rows' gradients, added in place."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, tied: TiedGrad) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.tied, ctx.weight_shape = tied, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        grad_w, ctx.tied.grad = ctx.tied.grad, None
        if grad_w is None:  # the decoder did not run (or returned its gradient itself)
            grad_w = grad.new_zeros(ctx.weight_shape)
        grad_w.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))  # [V, H] += rows
        return None, grad_w, None


class WordEmbedding(nn.Embedding):
    """``nn.Embedding`` whose forward can take a :class:`TiedGrad` (given by the pretraining model on
    CPU fp32 training, where its decoder fills it)."""

    def forward(self, input_ids: torch.Tensor, tied: TiedGrad | None = None) -> torch.Tensor:
        if tied is None or self.padding_idx is not None or self.max_norm is not None or self.sparse:
            return super().forward(input_ids)
        return _TiedLookup.apply(input_ids, self.weight, tied)  # [B, T, H]


class Embeddings(nn.Module):
    """word + position + segment embeddings → LayerNorm → dropout."""

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int,
                 eps: float, dropout: float):
        super().__init__()
        self.word_embeddings = WordEmbedding(vocab_size, hidden)  # swappable by a vocab-parallel pass
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions), persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                tied: TiedGrad | None = None) -> torch.Tensor:
        # Every table is read through its module's forward (ZeRO-3 gathers parameters per module call).
        T = input_ids.shape[1]
        if tied is not None and isinstance(self.word_embeddings, WordEmbedding):
            x = self.word_embeddings(input_ids, tied)  # [B, T, H]
        else:
            x = self.word_embeddings(input_ids)  # [B, T, H]
        x = x + self.position_embeddings(self.position_ids[:T])  # [T, H] broadcast over B
        if token_type_ids is None:
            x = x + self.token_type_embeddings(self.position_ids[:1])  # [1, H]: segment 0
        else:
            x = x + self.token_type_embeddings(token_type_ids)  # [B, T, H]
        return self.dropout(self.norm(x))  # [B, T, H]


def _attention_with_dropout(q, k, v, attn_mask, p: float) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) with dropout, times v; what SDPA's math path does, with :func:`dropout`.
    The reference for :class:`_CPUAttention`; runs where that one does not (autocast, bf16)."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # [B, nh, T, T]
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))  # mask [B, 1, 1, T]
    probs = dropout(torch.softmax(scores, dim=-1), p, True)  # [B, nh, T, T]
    return torch.matmul(probs, v)  # [B, nh, T, hd]


class _CPUAttention(torch.autograd.Function):
    """Attention with dropout on CPU, fp32/fp64, straight from the fused projection: qkv [B, T, 3H]
    (columns q, k, v, each nh × hd) → y [B, T, H] (heads merged), with a hand-written backward.

    Head by head with 3-D ``bmm`` on strided views: a head's q, k, v are [B, T, hd] slices of qkv
    with row stride 3H, which MKL's batched gemm reads in place, so nothing is copied to split the
    heads (the 4-D ``matmul`` of :func:`_attention_with_dropout` copies kᵀ and v, its backward stacks
    and copies the q, k, v gradients, and the head merge copies y). The 1/√hd scale is the gemm's
    alpha; dropout multiplies by the compiled kernel's mask (:mod:`cpu_kernels`: from a seed, regenerated
    in backward) or, without the kernels, a float mask drawn once for all heads ([nh, B, T, T]). Saved
    for backward: qkv and the probabilities (and that mask); the dropped probabilities are recomputed.
    ``mask_add``: None or [B, 1, T] additive (0 attend, -inf padding)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, mask_add: torch.Tensor | None, num_heads: int, p: float):
        B, T, H3 = qkv.shape
        nh, hd = num_heads, H3 // (3 * num_heads)
        scale = hd ** -0.5
        q, k, v = qkv.view(B, T, 3, nh, hd).unbind(2)  # each [B, T, nh, hd] (strided views)
        # dropout: the kernel's mask stream (seed; head h covers elements [h·B·T², (h+1)·B·T²)), or a
        # stored float mask [nh, B, T, T] where the kernels are unavailable
        seed = cpu_kernels.draw_seed() if cpu_kernels.available() else None
        keep = _keep_mask((nh, B, T, T), p, qkv.dtype) if seed is None else None
        scores = qkv.new_empty(B, T, T)  # scratch, reused per head
        y = qkv.new_empty(nh, B, T, hd)
        probs = []
        for h in range(nh):
            kt = k[:, :, h].transpose(1, 2)  # [B, hd, T]
            if mask_add is None:
                torch.baddbmm(scores, q[:, :, h], kt, beta=0.0, alpha=scale, out=scores)  # [B, T, T]
            else:
                torch.baddbmm(mask_add.expand(B, T, T), q[:, :, h], kt, alpha=scale, out=scores)
            probs.append(torch.softmax(scores, dim=-1))  # [B, T, T]
            if seed is None:
                torch.mul(probs[h], keep[h], out=scores)  # dropped probabilities
            else:
                cpu_kernels.dropout_mul(probs[h], p, seed, h * B * T * T, out=scores)
            torch.bmm(scores, v[:, :, h], out=y[h])  # [B, T, hd]
        ctx.save_for_backward(qkv, *probs, *(() if keep is None else (keep,)))
        ctx.scale, ctx.seed, ctx.p, ctx.nh = scale, seed, p, nh
        return y.permute(1, 2, 0, 3).reshape(B, T, nh * hd)  # [B, T, H]: the one copy, merging heads

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        qkv, *probs = ctx.saved_tensors
        nh, seed, p = ctx.nh, ctx.seed, ctx.p
        keep = probs.pop() if seed is None else None
        B, T, H3 = qkv.shape
        hd = H3 // (3 * nh)
        q, k, v = qkv.view(B, T, 3, nh, hd).unbind(2)  # each [B, T, nh, hd]
        g = grad_y.reshape(B, T, nh, hd)  # [B, T, nh, hd]
        grad = qkv.new_empty(3, nh, B, T, hd)  # dq, dk, dv per head, contiguous for the gemm outputs
        dropped = qkv.new_empty(B, T, T)  # scratch
        dprobs = qkv.new_empty(B, T, T)  # scratch
        for h in range(nh):
            gy = g[:, :, h]  # [B, T, hd] (strided)
            start = h * B * T * T
            if seed is None:
                torch.mul(probs[h], keep[h], out=dropped)  # [B, T, T] the dropped probabilities again
            else:
                cpu_kernels.dropout_mul(probs[h], p, seed, start, out=dropped)
            torch.bmm(dropped.transpose(1, 2), gy, out=grad[2, h])  # dv = droppedᵀ gy
            torch.bmm(gy, v[:, :, h].transpose(1, 2), out=dprobs)  # d dropped [B, T, T]
            if seed is None:
                dprobs.mul_(keep[h])  # d probs
            else:
                cpu_kernels.dropout_mul(dprobs, p, seed, start, out=dprobs)
            ds = torch._softmax_backward_data(dprobs, probs[h], -1, qkv.dtype)  # d scores [B, T, T]
            torch.baddbmm(grad[0, h], ds, k[:, :, h], beta=0.0, alpha=ctx.scale, out=grad[0, h])  # dq
            torch.baddbmm(grad[1, h], ds.transpose(1, 2), q[:, :, h], beta=0.0, alpha=ctx.scale,
                          out=grad[1, h])  # dk
        return grad.permute(2, 3, 0, 1, 4).reshape(B, T, H3), None, None, None  # [B, T, 3H]


class _TileAttention(torch.autograd.Function):
    """Attention with dropout on CPU, float32, by :func:`cpu_kernels.attention_forward`: each (head,
    sequence) tile's scores, softmax, dropout and products in one pass on one thread while the tile
    is in cache; qkv [B, T, 3H] read in place, y [B, T, H] written with heads merged, and the backward
    writes the qkv gradient in place of its layout (no split or merge copies). ``bias``: the qkv
    projection's bias (or None), which the projection then leaves out: the kernel applies it per tile
    at O(T·hd) cost (no broadcast copy before the projection's gemm, no pass over the qkv gradient
    for its gradient; a key bias has exactly no effect through the softmax, and gets gradient 0).
    The dropout mask is the kernels' stream over the probabilities [nh, B, T, T] (that of
    :class:`_CPUAttention`); saved for backward: qkv, the bias and the probabilities.
    ``mask_add``: None or [B, T] additive (0 attend, -inf padding)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor | None, mask_add: torch.Tensor | None, num_heads: int,
                p: float):
        seed = cpu_kernels.draw_seed()
        y, probs = cpu_kernels.attention_forward(qkv, mask_add, num_heads, p, seed, bias)
        # (a detached alias of the bias: its values as of now, whatever ZeRO does to the parameter later)
        ctx.save_for_backward(qkv, probs, None if bias is None else bias.detach())
        ctx.nh, ctx.p, ctx.seed = num_heads, p, seed
        return y  # [B, T, H]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        qkv, probs, bias = ctx.saved_tensors
        need_bias = bias is not None and ctx.needs_input_grad[1]
        grad, grad_bias = cpu_kernels.attention_backward(grad_y.contiguous(), qkv, probs, ctx.nh, ctx.p, ctx.seed,
                                                         bias, bias_grad=need_bias)
        return grad, grad_bias, None, None, None  # [B, T, 3H], [3H]


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused QKV projection, SDPA, output projection."""

    def __init__(self, hidden: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.qkv = Linear(hidden, 3 * hidden)  # rows: [q; k; v], each [H, H]
        self.out = Linear(hidden, hidden)
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, add_bias: bool = True) -> torch.Tensor:
        """``add_bias=False``: the output projection's bias is left to the caller (a fused residual)."""
        B, T, H = x.shape
        p = self.attention_dropout if self.training else 0.0
        # SDPA's CPU kernels have no dropout: it would fall back to the math path with bernoulli_
        cpu_dropout = p > 0.0 and x.device.type == "cpu" and not torch.compiler.is_compiling()
        if cpu_dropout and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu"):
            mask_add = None
            if attn_mask is not None:  # [B, 1, 1, T] bool → [B, 1, T] additive
                mask_add = torch.zeros(B, 1, T, dtype=x.dtype).masked_fill_(~attn_mask[:, 0], float("-inf"))
            if x.dtype == torch.float32 and self.qkv.weight.dtype == x.dtype and cpu_kernels.attention_available():
                # the bias goes to the kernel, unless ZeRO-3 manages it (then only the qkv call may read it)
                bias = self.qkv.bias
                fold = bias is not None and bias.dtype == x.dtype and not zero3_partitioned(bias)
                qkv = self.qkv(x, add_bias=not fold).contiguous()  # [B, T, 3H]
                y = _TileAttention.apply(qkv, bias if fold else None,
                                         None if mask_add is None else mask_add.view(B, T), self.num_heads, p)
            else:
                y = _CPUAttention.apply(self.qkv(x), mask_add, self.num_heads, p)
            return self.out(y, add_bias)  # [B, T, H]
        qkv = self.qkv(x)  # [B, T, 3H]
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # each [B, nh, T, hd] (strided views)
        if cpu_dropout:
            y = _attention_with_dropout(q, k, v, attn_mask, p)  # [B, nh, T, hd]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # [B, nh, T, hd]
        y = y.transpose(1, 2).reshape(B, T, H)  # [B, T, H]
        return self.out(y, add_bias)  # [B, T, H]


class FeedForward(nn.Module):
    """Linear H → F with the activation (:class:`LinearGelu`: bias + GELU in one CPU kernel pass),
    linear F → H."""

    def __init__(self, hidden: int, ffn: int, activation: str):
        super().__init__()
        self.up = LinearGelu(hidden, ffn, activation)
        self.down = Linear(ffn, hidden)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        return self.down(self.up(x), add_bias)  # [B, T, H] via [B, T, F]


class Block(nn.Module):
    """One transformer block; ``pre_norm`` chooses x + f(LN(x)) over LN(x + f(x)). Post-LN on CPU runs
    each ``LN(x + dropout(f(x)))`` as one kernel with the projection's bias folded in
    (:class:`ResidualLayerNorm`)."""

    def __init__(self, hidden: int, num_heads: int, ffn: int, eps: float, dropout: float,
                 attention_dropout: float, activation: str, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = SelfAttention(hidden, num_heads, attention_dropout)
        self.attn_norm = ResidualLayerNorm(hidden, eps=eps)
        self.ffn = FeedForward(hidden, ffn, activation)
        self.ffn_norm = ResidualLayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        p, training = self.dropout.p, self.training
        if self.pre_norm:
            x = dropout_add(self.attn(self.attn_norm(x), attn_mask), x, p, training)  # [B, T, H]
            return dropout_add(self.ffn(self.ffn_norm(x)), x, p, training)  # [B, T, H]
        q = p if training else 0.0
        if q < 1.0 and self.attn_norm.fusable(x, self.attn.out.bias) and self.ffn_norm.fusable(x, self.ffn.down.bias):
            x = self.attn_norm(self.attn(x, attn_mask, add_bias=False), x, self.attn.out.bias, q)  # [B, T, H]
            return self.ffn_norm(self.ffn(x, add_bias=False), x, self.ffn.down.bias, q)  # [B, T, H]
        x = self.attn_norm(dropout_add(self.attn(x, attn_mask), x, p, training))  # [B, T, H]
        return self.ffn_norm(dropout_add(self.ffn(x), x, p, training))  # [B, T, H]


def check_model_inputs(input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                       attention_mask: torch.Tensor | None, max_positions: int,
                       vocab_size: int | None = None, type_vocab_size: int | None = None) -> None:
    """Raise a ValueError naming the bad value. Shape checks are free; the id ranges (given
    ``vocab_size``) read the tensors, which is a host sync on an accelerator."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if T > max_positions:
        raise ValueError(f"sequence length {T} exceeds model.max_position_embeddings={max_positions}")
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
        raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, "
                         f"input_ids has {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                         f"{tuple(input_ids.shape)} like input_ids ([batch, seq], True on real tokens)")
    if vocab_size is not None and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if type_vocab_size is not None and token_type_ids is not None and token_type_ids.numel():
        lo, hi = int(token_type_ids.min()), int(token_type_ids.max())
        if lo < 0 or hi >= type_vocab_size:
            bad = hi if hi >= type_vocab_size else lo
            raise ValueError(f"token type id {bad} is outside [0, model.type_vocab_size={type_vocab_size})")


class Encoder(nn.Module):
    """Embeddings and a stack of blocks: (input_ids, token_type_ids, attention_mask) → hidden [B, T, H].

    ``check_inputs``: verify id ranges on every call. Off by default on accelerators (it syncs);
    inputs on the CPU are always checked, which costs a pass over B×T ids and no sync.
    """

    def __init__(self, vocab_size: int, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 ffn_size: int = 3072, max_position_embeddings: int = 512, type_vocab_size: int = 2,
                 dropout: float = 0.1, attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 norm_position: str = "post", activation: str = "gelu", init_std: float = 0.02,
                 check_inputs: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"model.hidden_size={hidden_size} is not divisible by model.num_heads={num_heads}")
        if norm_position not in ("post", "pre"):
            raise ValueError(f"model.norm_position={norm_position!r}; choose 'post' or 'pre'")
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        activation_fn(activation)  # validates the name
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.max_positions = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.check_inputs = check_inputs
        self.embeddings = Embeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                     layer_norm_eps, dropout)
        self.layers = nn.ModuleList(
            Block(hidden_size, num_heads, ffn_size, layer_norm_eps, dropout, attention_dropout, activation,
                  pre_norm=norm_position == "pre") for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if norm_position == "pre" else None
        init_bert_weights(self, init_std)

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int, check_inputs: bool = False) -> "Encoder":
        """Build from a :class:`megamlm.config.ModelConfig` with ``vocab_size`` embedding rows."""
        m = model_cfg
        return cls(vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.ffn_size,
                   m.max_position_embeddings, m.type_vocab_size, m.dropout, m.attention_dropout,
                   m.layer_norm_eps, m.norm_position, m.activation, m.init_std, check_inputs)

    @property
    def vocab_size(self) -> int:
        return self.embeddings.word_embeddings.num_embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, tied: TiedGrad | None = None) -> torch.Tensor:
        """input_ids [B, T] int64, token_type_ids [B, T] or None (all segment 0), attention_mask [B, T]
        bool (True on real tokens) or None (no padding: SDPA runs without a mask). → hidden [B, T, H].
        ``tied``: see :class:`TiedGrad` (the pretraining model's business).

        Hidden states at padded positions are computed but meaningless; real positions never attend
        to padding, so they do not depend on how much padding follows.
        """
        # value checks read the ids: free on CPU, a sync on accelerators, data-dependent under compile
        check_ids = ((self.check_inputs or input_ids.device.type == "cpu")
                     and not torch.compiler.is_compiling())
        check_model_inputs(input_ids, token_type_ids, attention_mask, self.max_positions,
                           self.vocab_size if check_ids else None,
                           self.type_vocab_size if check_ids else None)
        attn_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, T] True = attend
        x = self.embeddings(input_ids, token_type_ids, tied)  # [B, T, H]
        for layer in self.layers:
            x = layer(x, attn_mask)  # [B, T, H]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x  # [B, T, H]


def num_params(module: nn.Module) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in module.parameters())

