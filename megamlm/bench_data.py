"""The batches the benchmarks train on: a synthetic one (:func:`random_batch`), or the first micro-batches of a
config's training loader (:func:`bench_batches` with ``--data``). Used by ``megamlm bench model`` and by the
tests as a source of well-formed batches."""

from __future__ import annotations

import torch

__all__ = ["random_batch", "bench_batches"]


def random_batch(batch_size: int, seq_len: int, vocab_size: int, mlm_probability: float = 0.15,
                 padding: bool = False, pair: bool = True, seed: int = 0, device: str = "cpu"):
    """A synthetic :class:`megamlm.data.batch.Batch`: random ids, segments split mid-sequence, about
    ``mlm_probability`` of the real non-[CLS] tokens as targets, optional right padding."""
    from megamlm.data.batch import IGNORE_INDEX, Batch

    g = torch.Generator().manual_seed(seed)
    B, T = batch_size, seq_len
    ids = torch.randint(5, vocab_size, (B, T), generator=g)  # [B, T]
    if padding:
        lengths = torch.randint(max(2, T // 2), T + 1, (B,), generator=g)
        lengths[0] = T
    else:
        lengths = torch.full((B,), T)
    ar = torch.arange(T)
    mask = ar[None, :] < lengths[:, None]  # [B, T] True on real tokens
    ids = torch.where(mask, ids, torch.zeros_like(ids))  # pad id 0
    ids[:, 0] = 2  # [CLS]
    types = ((ar[None, :] >= (lengths[:, None] // 2)) & mask).long()  # [B, T]
    chosen = (torch.rand(B, T, generator=g) < mlm_probability) & mask
    chosen[:, 0] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))  # [B, T]
    positions = chosen.view(-1).nonzero().squeeze(-1)  # [N] (host side, as the loader does)
    targets = labels.view(-1)[positions]  # [N]
    pair_labels = torch.randint(0, 2, (B,), generator=g) if pair else None
    batch = Batch(ids, types, mask, labels, positions, targets, pair_labels, n_tokens=int(mask.sum()))
    return batch.to(device) if device != "cpu" else batch


def bench_batches(o) -> list:
    """The batches every model of a run (``o``: :class:`megamlm.bench.BenchOptions`) trains on, in turn: one
    random batch (:func:`random_batch`), or with ``o.data`` the first ``o.data_batches`` micro-batches of that
    config's training loader (its corpus, tokenizer and masking; seq_len, batch_size, pair and seed from
    ``o``), padded; ``o.vocab_size`` becomes the tokenizer's padded size."""
    if not o.data:
        if o.data_batches != 1:
            raise ValueError(f"--data-batches {o.data_batches} needs --data (a corpus to take them from)")
        return [random_batch(o.batch_size, o.seq_len, o.vocab_size, o.mlm_probability, o.padding,
                             o.pair != "none", o.seed, o.device)]
    if o.data_batches < 1:
        raise ValueError(f"--data-batches {o.data_batches} must be >= 1")
    from megamlm.config import load_config
    from megamlm.data.loader import build_loader
    from megamlm.distributed.topology import single_process_topology
    from megamlm.tokenizer import Tokenizer

    cfg = load_config(o.data, [f"data.seq_len={o.seq_len}", f"data.micro_batch_size={o.batch_size}",
                               "data.num_workers=0", "data.packing=false", "data.micro_batch_tokens=0",
                               f"objective.pair={o.pair}", f"objective.mlm_probability={o.mlm_probability}",
                               f"model.max_position_embeddings={max(512, o.seq_len)}"])
    tok = Tokenizer(cfg.tokenizer.model)
    loader = build_loader(cfg.data, tok, single_process_topology(), o.seed, cfg.objective)
    it = iter(loader)
    batches = [next(it) for _ in range(o.data_batches)]
    for k, batch in enumerate(batches):
        if batch.n_examples != o.batch_size:
            raise ValueError(f"--data {o.data}: its micro-batch {k} holds {batch.n_examples} examples, not "
                             f"--batch-size {o.batch_size} (a corpus too small for {o.data_batches} batches)")
    o.vocab_size = tok.padded_vocab_size
    return [b.to(o.device) if o.device != "cpu" else b for b in batches]
