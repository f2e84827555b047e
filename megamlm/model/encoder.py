"""The BERT encoder for one device: embeddings → N blocks → hidden [B, T, H].

Reads top-down: :class:`Embeddings`, :class:`SelfAttention`, :class:`FeedForward`, :class:`Block`,
:class:`Encoder`. The encoder knows nothing of MLM, NSP or SOP; heads live in ``heads.py``.

* Post-LN (BERT) by default, pre-LN with ``norm_position="pre"`` (then a final LayerNorm closes the
  stack).
* Each step with a fused implementation is a call to a named op of the model's backend
  (``self.ops``, :mod:`megamlm.ops`): ``attention``, ``linear_act``, ``dropout``, ``dropout_add``,
  ``projection_residual_norm``, ``embedding``. Which backend (plain torch: SDPA on GPUs; the compiled
  CPU kernels) is chosen once per model build; the model never tests the device.
* Q, K and V come from one fused ``qkv`` linear ([3H, H], rows ordered q, k, v: the HF conversion
  table splits it into query / key / value).
* The padding mask is passed to attention only when the batch may contain padding;
  ``attention_mask=None`` means "every position is real" and lets SDPA take its fastest path (see
  :meth:`Encoder.forward`).
* No tensor parallelism in here: ``embeddings.word_embeddings`` is a plain embedding attribute that a
  parallelize function can swap on a finished model.
"""

from __future__ import annotations

import torch
from torch import nn

from megamlm import ops as ops_layer
from megamlm.ops import Embedding, LayerNorm, Linear, activation_fn

__all__ = ["Dropout", "Embeddings", "SelfAttention", "FeedForward", "Block", "Encoder", "init_bert_weights",
           "activation_fn", "check_model_inputs"]


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


class Dropout(nn.Dropout):
    """``nn.Dropout`` through the backend's ``dropout`` op (same module interface)."""

    ops = ops_layer.DEFAULT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.dropout(x, self.p, self.training)


class Embeddings(nn.Module):
    """word + position + segment embeddings → LayerNorm → dropout."""

    ops = ops_layer.DEFAULT

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int,
                 eps: float, dropout: float):
        super().__init__()
        self.word_embeddings = Embedding(vocab_size, hidden)  # swappable by a vocab-parallel pass
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions), persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` [T] (a packed stream: positions restart in each example) or None (0..T-1)."""
        # Every table is read through its module's call (ZeRO-3 gathers parameters per module call).
        T = input_ids.shape[1]
        if isinstance(self.word_embeddings, Embedding):
            x = self.ops.embedding(self.word_embeddings, input_ids)  # [B, T, H]
        else:  # a vocab-parallel table
            x = self.word_embeddings(input_ids)  # [B, T, H]
        x = x + self.position_embeddings(self.position_ids[:T] if position_ids is None else position_ids)  # [T, H]
        if token_type_ids is None:
            x = x + self.token_type_embeddings(self.position_ids[:1])  # [1, H]: segment 0
        else:
            x = x + self.token_type_embeddings(token_type_ids)  # [B, T, H]
        return self.dropout(self.norm(x))  # [B, T, H]


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused QKV projection, the backend's ``attention``, output projection
    (applied by the block: it may fuse it with the residual and the norm)."""

    ops = ops_layer.DEFAULT

    def __init__(self, hidden: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.qkv = Linear(hidden, 3 * hidden)  # rows: [q; k; v], each [H, H]
        self.out = Linear(hidden, hidden)
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, segments=None) -> torch.Tensor:
        """x [B, T, H], attn_mask [B, 1, 1, T] or None → heads merged [B, T, H], before ``self.out``;
        ``segments`` (:class:`megamlm.ops.Segments`, x [1, N, H]): attention stays inside each example."""
        p = self.attention_dropout if self.training else 0.0
        if segments is None:
            return self.ops.attention(self.qkv, x, self.num_heads, attn_mask, p)  # [B, T, H]
        return self.ops.attention(self.qkv, x, self.num_heads, attn_mask, p, segments=segments)  # [1, N, H]


class FeedForward(nn.Module):
    """Linear H → F with the activation (the backend's ``linear_act``), linear F → H (applied by the block)."""

    ops = ops_layer.DEFAULT

    def __init__(self, hidden: int, ffn: int, activation: str):
        super().__init__()
        activation_fn(activation)  # validates the name
        self.activation = activation
        self.up = Linear(hidden, ffn)
        self.down = Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] → act(up(x)) [B, T, F], before ``self.down``."""
        return self.ops.linear_act(self.up, x, self.activation)  # [B, T, F]


class Block(nn.Module):
    """One transformer block; ``pre_norm`` chooses x + f(LN(x)) over LN(x + f(x)). Each sublayer's
    output projection, dropout, residual (and, post-LN, norm) is one op of the backend."""

    ops = ops_layer.DEFAULT

    def __init__(self, hidden: int, num_heads: int, ffn: int, eps: float, dropout: float,
                 attention_dropout: float, activation: str, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = SelfAttention(hidden, num_heads, attention_dropout)
        self.attn_norm = LayerNorm(hidden, eps=eps)
        self.ffn = FeedForward(hidden, ffn, activation)
        self.ffn_norm = LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, segments=None) -> torch.Tensor:
        p, training, ops = self.dropout.p, self.training, self.ops
        if self.pre_norm:
            a = self.attn(self.attn_norm(x), attn_mask, segments)
            x = ops.dropout_add(self.attn.out(a), x, p, training)  # [B, T, H]
            return ops.dropout_add(self.ffn.down(self.ffn(self.ffn_norm(x))), x, p, training)  # [B, T, H]
        x = ops.projection_residual_norm(self.attn.out, self.attn(x, attn_mask, segments), x, self.attn_norm, p,
                                         training)
        return ops.projection_residual_norm(self.ffn.down, self.ffn(x), x, self.ffn_norm, p, training)  # [B, T, H]


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


def _check_segments(input_ids: torch.Tensor, attention_mask, segments, max_positions: int) -> None:
    if attention_mask is not None:
        raise ValueError("a packed stream (segments) has no padding: pass attention_mask=None")
    if input_ids.shape[0] != 1:
        raise ValueError(f"a packed stream is one row [1, N]; input_ids has shape {tuple(input_ids.shape)}")
    if segments.max_seqlen > max_positions:
        raise ValueError(f"a packed example of {segments.max_seqlen} tokens exceeds "
                         f"model.max_position_embeddings={max_positions}")
    if ops_layer.host_readable(segments.cu_seqlens) and int(segments.cu_seqlens[-1]) != input_ids.shape[1]:
        raise ValueError(f"segments cover {int(segments.cu_seqlens[-1])} tokens, input_ids has {input_ids.shape[1]}")


class Encoder(nn.Module):
    """Embeddings and a stack of blocks: (input_ids, token_type_ids, attention_mask) → hidden [B, T, H].

    ``check_inputs``: verify id ranges on every call. Off by default on accelerators (it syncs);
    inputs on the CPU are always checked, which costs a pass over B×T ids and no sync.
    """

    def __init__(self, vocab_size: int, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 ffn_size: int = 3072, max_position_embeddings: int = 512, type_vocab_size: int = 2,
                 dropout: float = 0.1, attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 norm_position: str = "post", activation: str = "gelu", init_std: float = 0.02,
                 check_inputs: bool = False, embeddings: bool = True):
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
        # embeddings=False: a stack run on another encoder's embeddings (the ELECTRA generator, :meth:`run_layers`)
        self.embeddings = Embeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                     layer_norm_eps, dropout) if embeddings else None
        self.layers = nn.ModuleList(
            Block(hidden_size, num_heads, ffn_size, layer_norm_eps, dropout, attention_dropout, activation,
                  pre_norm=norm_position == "pre") for _ in range(num_layers))
        self.final_norm = LayerNorm(hidden_size, eps=layer_norm_eps) if norm_position == "pre" else None
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

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block in place (``nn.Module.compile``: parameter names, and so checkpoints
        and conversion, unchanged); inside a compiled block the ops run their torch code, which inductor
        fuses (bias + GELU, dropout + residual + LayerNorm)."""
        for layer in self.layers:
            layer.compile(**options)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, segments=None) -> torch.Tensor:
        """input_ids [B, T] int64, token_type_ids [B, T] or None (all segment 0), attention_mask [B, T]
        bool (True on real tokens) or None (no padding: SDPA runs without a mask). → hidden [B, T, H].

        Hidden states at padded positions are computed but meaningless; real positions never attend
        to padding, so they do not depend on how much padding follows.

        ``segments`` (:class:`megamlm.ops.Segments`): a packed stream, input_ids [1, N] holding E examples
        back to back; positions restart at 0 in each, attention stays inside each, no padding is computed;
        ``attention_mask`` must then be None.
        """
        x, attn_mask = self.embed(input_ids, token_type_ids, attention_mask, segments)
        return self.run_layers(x, attn_mask, segments)  # [B, T, H]

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, segments=None):
        """The inputs checked and embedded, as :meth:`forward` takes them → (x [B, T, H], the attention mask
        [B, 1, 1, T] bool or None) for :meth:`run_layers`, this encoder's or another stack's."""
        # value checks read the ids: free on CPU, a sync on accelerators, data-dependent under compile
        check_ids = ops_layer.host_readable(input_ids) or (self.check_inputs and not torch.compiler.is_compiling())
        longest = self.max_positions if segments is None else input_ids.shape[1]  # packed: checked per example
        check_model_inputs(input_ids, token_type_ids, attention_mask, longest,
                           self.vocab_size if check_ids else None,
                           self.type_vocab_size if check_ids else None)
        position_ids = None
        if segments is not None:
            _check_segments(input_ids, attention_mask, segments, self.max_positions)
            position_ids = segments.position_ids(input_ids.shape[1])
        attn_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, T] True = attend
        return self.embeddings(input_ids, token_type_ids, position_ids), attn_mask  # [B, T, H]

    def run_layers(self, x: torch.Tensor, attn_mask: torch.Tensor | None, segments=None) -> torch.Tensor:
        """The blocks (and the pre-LN final norm) on embedded inputs x [B, T, H] → hidden [B, T, H]."""
        for layer in self.layers:
            x = layer(x, attn_mask, segments)  # [B, T, H]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x  # [B, T, H]


def num_params(module: nn.Module) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in module.parameters())

