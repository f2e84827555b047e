"""Heads on the encoder's hidden states: masked-LM (tied decoder, masked rows only) and sentence pair.

The MLM head gathers the masked rows *first* — ``hidden.view(B*T, H).index_select(0, positions)`` with
positions computed on the host by the loader — and projects only those [N, H] → [N, V]: HF computes
all B×T rows (transformers#3294), ~6× more vocabulary FLOPs at 15% masking.

The decoder weight is the word-embedding ``Parameter`` itself (tied: same storage), held by a small
module so that ZeRO-3 gathers it when the decoder runs. Rows ≥ ``n_predicted`` (padding added to make
the vocabulary a multiple of 128) are never projected, hence never predicted nor given probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamlm.model.encoder import TiedGrad, activation_fn, init_bert_weights

__all__ = ["TiedDecoder", "MLMHead", "PairHead"]


def _storage_in_use(t: torch.Tensor) -> bool:
    """Whether anything besides ``t`` holds its storage (a view, a saved tensor of a pending graph).
    Unknown → True (never reuse)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return True
    return count(t.untyped_storage()._cdata) > 2  # t's reference and the temporary storage object


class _LinearInWorkspace(torch.autograd.Function):
    """``F.linear(h, w, b)`` → [N, V] written into ``holder``'s reused workspace; backward as F.linear's.

    On CPU a fresh tensor above glibc's mmap threshold (at most 32 MB) is mapped anew and page-faulted
    in on every step: the bench's MLM logits (603 × 30522 fp32, 74 MB) cost ~18k faults, ~15 ms a step,
    all in the bias fill of ``addmm``. The logits exist for the loss alone (which writes their gradient
    into them), so the next step may reuse the memory once nothing holds it."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, holder: "TiedDecoder",
                tied: TiedGrad | None = None):
        ctx.save_for_backward(h, w)
        ctx.tied, ctx.weight_rows = tied, holder.weight.shape[0]
        out = holder._workspace(h.shape[0], w.shape[0], h.dtype)  # [N, V]
        if b is None:  # the bias is the caller's (the loss adds it chunk by chunk)
            return torch.mm(h, w.t(), out=out)
        return torch.addmm(b, h, w.t(), out=out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w = ctx.saved_tensors  # [N, H], [V, H]; grad [N, V]
        grad_h = grad.mm(w) if ctx.needs_input_grad[0] else None  # [N, H]
        grad_w = None
        if ctx.needs_input_grad[1] and ctx.tied is not None:  # left for the tied lookup, full rows
            full = grad.new_empty(ctx.weight_rows, h.shape[1])  # [V_rows, H]
            torch.mm(grad.t(), h, out=full[:w.shape[0]])
            full[w.shape[0]:].zero_()  # vocabulary padding rows: never predicted
            ctx.tied.grad = full
        elif ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(h)  # [V, H]
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None  # [V] (None when b was None)
        return grad_h, grad_w, grad_b, None, None


class TiedDecoder(nn.Module):
    """[N, H] → [N, n_predicted] with the (tied) word-embedding weight [V, H] and its own bias [V].

    ``scratch=True`` (logits made for the loss alone, see :class:`_LinearInWorkspace`): on CPU in fp32
    the logits are written into a workspace kept between calls, reused when nothing holds it any more
    (else a new one is made: two forwards before a backward stay correct)."""

    def __init__(self, weight: nn.Parameter, n_predicted: int | None = None):
        super().__init__()
        vocab = weight.shape[0]
        n_predicted = vocab if n_predicted is None else n_predicted
        if not 0 < n_predicted <= vocab:
            raise ValueError(f"real vocabulary size {n_predicted} must be in [1, {vocab}] (the embedding rows)")
        self.weight = weight  # the word embedding's Parameter: same storage
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.n_predicted = n_predicted
        self._ws = None  # the scratch logits' workspace (a plain attribute: not state)

    def _workspace(self, n: int, v: int, dtype: torch.dtype) -> torch.Tensor:
        """An [n, v] view of the workspace, a new one when too small or still held."""
        ws = self._ws
        if ws is None or ws.numel() < n * v or ws.dtype != dtype or _storage_in_use(ws):
            ws = self._ws = torch.empty(n * v + (n * v >> 3), dtype=dtype)  # 1/8 slack: N varies by batch
        return ws[:n * v].view(n, v)

    def scratch_path(self) -> bool:
        """Whether a ``scratch`` forward takes the workspace (CPU fp32, no autocast, not compiling):
        only then does it fill a :class:`TiedGrad`."""
        w = self.weight
        return (w.device.type == "cpu" and w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling())

    def forward(self, h: torch.Tensor, scratch: bool = False, tied: TiedGrad | None = None,
                add_bias: bool = True) -> torch.Tensor:
        """``tied``: on the scratch path the weight's gradient is left there for the word-embedding
        lookup of the same forward (which must then get the same ``tied``), not returned.
        ``add_bias=False``: logits without the bias (:meth:`loss_bias`, which the loss then adds)."""
        n = self.n_predicted
        w, b = (self.weight, self.bias) if n == self.weight.shape[0] else (self.weight[:n], self.bias[:n])
        # [V_real, H], [V_real]: contiguous row slices, no copy
        b = b if add_bias else None
        if scratch and h.dtype == torch.float32 and self.scratch_path():
            return _LinearInWorkspace.apply(h, w, b, self, tied)  # [N, V_real]
        if tied is not None:
            raise ValueError("a TiedGrad needs the scratch path (CPU fp32 training logits)")
        return F.linear(h, w, b)  # [N, V_real]

    def loss_bias(self) -> torch.Tensor:
        """The bias of the predicted rows [V_real] (a view), for a loss that adds it itself."""
        n = self.n_predicted
        return self.bias if n == self.bias.shape[0] else self.bias[:n]


class MLMHead(nn.Module):
    """dense → activation → LayerNorm → tied decoder, on the masked rows only."""

    def __init__(self, hidden: int, eps: float, activation: str, word_embedding: nn.Parameter,
                 n_predicted: int | None = None, init_std: float = 0.02):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.act = activation_fn(activation)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        init_bert_weights(self, init_std)
        self.decoder = TiedDecoder(word_embedding, n_predicted)  # after init: never re-initialise the tie

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, scratch: bool = False,
                tied: TiedGrad | None = None, add_bias: bool = True) -> torch.Tensor:
        """hidden [B, T, H], positions [N] flat indices into B*T → logits [N, V_real]. ``scratch``: the
        logits are for the loss alone (the decoder may put them in a reused workspace); ``tied``: see
        :meth:`TiedDecoder.forward`."""
        H = hidden.shape[-1]
        rows = hidden.reshape(-1, H).index_select(0, positions)  # [N, H]
        h = self.norm(self.act(self.dense(rows)))  # [N, H]
        if tied is not None or not add_bias:  # (only the plain TiedDecoder takes these)
            return self.decoder(h, scratch=scratch, tied=tied, add_bias=add_bias)  # [N, V_real]
        return self.decoder(h, scratch=scratch)  # [N, V_real]


class PairHead(nn.Module):
    """tanh pooler on [CLS] → 2 classes (NSP: is-next / not-next; SOP: in order / swapped)."""

    def __init__(self, hidden: int, init_std: float = 0.02):
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 2)
        init_bert_weights(self, init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] → logits [B, 2]."""
        pooled = torch.tanh(self.pooler(hidden[:, 0]))  # [B, H]
        return self.classifier(pooled)  # [B, 2]
