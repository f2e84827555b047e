"""Packed micro-batches (issue 18, step 3): ``data.packing`` in the loader, the model and the counts.

The truths compared with: the padded loader's stream of examples (packing changes where batches end,
never which examples come in which order, nor their masks), each packed batch unpacked into a padded
one by the test (the model's loss terms and gradients must not change), and the config's rules.

A failure points at megamlm/data/stream.py (RankDataset.stream's token budget, _collate_packed),
megamlm/model/pretraining.py (hidden, pair_logits at the [CLS] indices), megamlm/flops.py or
megamlm/config/load.py (_packing_checks).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megamlm.config import ConfigError, ModelConfig, ObjectiveConfig
from megamlm.data.batch import IGNORE_INDEX, Batch
from megamlm.data.loader import build_loader
from megamlm.distributed.topology import single_process_topology
from megamlm.flops import train_flops
from megamlm.model import build_model
from tests import data_fixtures as F

SEQ, MB = 64, 8


make = F.make_loader


def epoch_batches(loader):
    out, epoch = [], loader.epoch
    for b, info in loader.iter_with_info():
        if info["epoch"] != epoch:
            break
        out.append((b, info))
    return out


def examples_of(batch: Batch) -> list[tuple]:
    """Each example's (ids, types, labels, pair label) as lists: unpacked, or the padding cut off."""
    out = []
    if batch.segments is not None:
        cu = batch.segments.cu_seqlens.tolist()
        rows = [(0, cu[e], cu[e + 1]) for e in range(len(cu) - 1)]
    else:
        lens = batch.attention_mask.sum(1).tolist()
        rows = [(r, 0, n) for r, n in enumerate(lens)]
    for e, (r, a, b) in enumerate(rows):
        pair = None if batch.pair_labels is None else int(batch.pair_labels[e])
        out.append((batch.input_ids[r, a:b].tolist(), batch.token_type_ids[r, a:b].tolist(),
                    batch.mlm_labels[r, a:b].tolist(), pair))
    return out


def unpack(batch: Batch, pad_id: int) -> Batch:
    """The padded batch of a packed one's examples (the reference layout)."""
    ex = examples_of(batch)
    T = max(len(e[0]) for e in ex)
    ids = torch.full((len(ex), T), pad_id, dtype=torch.int64)
    types = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for r, (i, t, lab, _) in enumerate(ex):
        ids[r, :len(i)], types[r, :len(i)], labels[r, :len(i)], mask[r, :len(i)] = (
            torch.tensor(i), torch.tensor(t), torch.tensor(lab), True)
    pos = torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).reshape(-1)
    return Batch(ids, types, mask, labels, pos, labels.reshape(-1)[pos], batch.pair_labels, int(mask.sum()))


@pytest.mark.parametrize("pair", ["nsp", "none"])
@pytest.mark.parametrize("budget", [0, 100])
def test_packed_batches_are_full_unpadded_rows_of_whole_examples(shards, tok, pair, budget):
    loader = make(shards, tok, pair=pair, packing=True, micro_batch_tokens=budget)
    limit = budget or MB * SEQ
    batches = [b for b, _ in epoch_batches(loader)]
    assert len(batches) > 3
    for k, b in enumerate(batches):
        N = b.input_ids.shape[1]
        cu = b.segments.cu_seqlens
        assert b.input_ids.shape == b.token_type_ids.shape == b.mlm_labels.shape == (1, N)
        assert b.attention_mask is None and b.n_tokens == N <= limit and cu.dtype == torch.int32
        assert int(cu[-1]) == N and b.n_examples == cu.numel() - 1
        assert b.segments.max_seqlen == int((cu[1:] - cu[:-1]).max()) <= SEQ
        assert (b.input_ids[0, cu[:-1].long()] == tok.special.cls).all()  # every example starts with [CLS]
        assert (b.input_ids != tok.special.pad).all()  # no padding anywhere
        flat = b.mlm_labels.reshape(-1)
        assert torch.equal(b.mlm_positions, torch.nonzero(flat != IGNORE_INDEX).reshape(-1))
        assert torch.equal(b.mlm_targets, flat[b.mlm_positions])
        if pair == "none":
            assert b.pair_labels is None
        else:
            assert b.pair_labels.shape == (b.n_examples,)
        if k + 1 < len(batches):  # greedy: the next batch's first example would not have fitted
            nxt = batches[k + 1].segments.cu_seqlens
            assert N + int(nxt[1]) > limit, f"batch {k}: {N} tokens + the next example's {int(nxt[1])} fit"


@pytest.mark.parametrize("pair,masking", [("nsp", "token"), ("sop", "span"), ("none", "whole_word")])
def test_packing_changes_batch_boundaries_not_the_examples_or_their_masks(shards, tok, pair, masking):
    padded = [x for b, _ in epoch_batches(make(shards, tok, pair=pair, masking=masking)) for x in examples_of(b)]
    packed_batches = [b for b, _ in epoch_batches(make(shards, tok, pair=pair, masking=masking, packing=True))]
    packed = [x for b in packed_batches for x in examples_of(b)]
    assert len(packed) == len(padded) > 100
    assert packed == padded
    assert sum(b.n_tokens for b in packed_batches) == sum(len(x[0]) for x in padded)
    assert len(packed_batches) < len(padded) / MB  # fuller batches: fewer of them


@pytest.mark.parametrize("workers,stop", [(0, 7), (2, 9)])
def test_packed_resume_is_exact(shards, tok, workers, stop):
    kw = dict(packing=True, micro_batch_tokens=150, num_workers=workers)
    ref_loader = make(shards, tok, **kw)
    it = iter(ref_loader)
    ref = [next(it) for _ in range(stop + 15)]
    a = make(shards, tok, **kw)
    it = iter(a)
    got = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(a.state_dict()))
    del it
    b = make(shards, tok, state=state, **kw)
    it = iter(b)
    got += [next(it) for _ in range(len(ref) - stop)]
    for i, (x, y) in enumerate(zip(ref, got)):
        assert examples_of(x) == examples_of(y), f"batch {i} differs after resuming at {stop}"
        assert torch.equal(x.segments.cu_seqlens, y.segments.cu_seqlens)


def _model(pair: str, tok):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position_embeddings=SEQ,
                      dropout=0.0, attention_dropout=0.0)
    return build_model(cfg, ObjectiveConfig(pair=pair), tok.padded_vocab_size, real_vocab_size=tok.vocab_size)


@pytest.mark.parametrize("pair", ["nsp", "sop", "none"])
def test_a_packed_batch_gives_the_padded_loss_terms_and_gradients(shards, tok, pair):
    """The model on a packed batch and on the same examples padded: every loss term (sums and counts,
    the pair head at each example's [CLS]) within 1e-5, and every parameter's gradient."""
    packed = next(iter(make(shards, tok, pair=pair, packing=True, micro_batch_tokens=200)))
    assert packed.n_examples >= 3
    padded = unpack(packed, tok.special.pad)
    model = _model(pair, tok)
    grads, terms = [], []
    for b in (packed, padded):
        model.zero_grad()
        t = model(b)
        sum(t.loss_sum.values()).backward()
        terms.append(t.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    want = ["mlm"] + ([] if pair == "none" else ["pair"])
    assert sorted(terms[0].loss_sum) == sorted(terms[1].loss_sum) == sorted(want)
    for k in want:
        torch.testing.assert_close(terms[0].loss_sum[k], terms[1].loss_sum[k], atol=1e-5, rtol=1e-5, msg=k)
        assert int(terms[0].n_targets[k]) == int(terms[1].n_targets[k]) > 0, k
        assert int(terms[0].n_correct[k]) == int(terms[1].n_correct[k]), k
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)
    if pair != "none":
        with torch.no_grad():
            got = model.pair_logits(model.hidden(packed), packed)  # at cu_seqlens[:-1]
            ref = model.pair_head(model.hidden(padded))  # column 0 of each padded row
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_flops_count_the_same_work_packed_and_padded(shards, tok):
    packed = next(iter(make(shards, tok, packing=True, micro_batch_tokens=200)))
    padded = unpack(packed, tok.special.pad)
    args = (32, 2, 64, tok.vocab_size, True)
    assert train_flops(packed, *args) == pytest.approx(train_flops(padded, *args), rel=1e-12)


@pytest.mark.parametrize("over,match", [
    (["data.micro_batch_tokens=512"], "applies to packed micro-batches only"),
    (["data.packing=true", "data.pad_to=max"], "data.pad_to=max"),
    (["data.packing=true", "data.micro_batch_tokens=32"], "smaller than data.seq_len=64"),
])
def test_packing_config_errors_name_the_keys(shards, over, match):
    with pytest.raises(ConfigError, match=match):
        F.data_config(shards, "data.seq_len=64", *over)


def test_pack_of_a_padded_batch_is_its_examples_in_one_row(shards, tok):
    from megamlm.data.batch import pack

    padded = next(iter(make(shards, tok, pair="sop", masking="span")))
    packed = pack(padded)
    assert packed.attention_mask is None and packed.n_tokens == padded.n_tokens == packed.input_ids.shape[1]
    assert examples_of(packed) == examples_of(padded)
    flat = packed.mlm_labels.reshape(-1)
    assert torch.equal(packed.mlm_targets, flat[packed.mlm_positions]) and packed.n_targets == padded.n_targets
    assert pack(packed) is packed
    left = unpack(packed, tok.special.pad)
    left.attention_mask = left.attention_mask.flip(1)  # padding first: not a right-padded batch
    with pytest.raises(ValueError, match="not right-padded"):
        pack(left)


def test_a_padded_state_resumes_packed_at_the_same_example(shards, tok, caplog):
    """Turning packing on at a resume: the cursors count examples, so the stream of examples goes on
    exactly where the padded run stopped (the log says the layout changed)."""
    ref = make(shards, tok)
    it = iter(ref)
    seen = [x for _ in range(5) for x in examples_of(next(it))]
    state = json.loads(json.dumps(ref.state_dict()))
    after = [x for _ in range(12) for x in examples_of(next(it))]
    assert state["packing"] == 0
    with caplog.at_level("INFO", logger="megamlm.data.loader"):
        resumed = make(shards, tok, state=state, packing=True, micro_batch_tokens=300)
    assert "saved padded (data.packing=false), resumed packed (300 tokens per micro-batch)" in caplog.text
    it = iter(resumed)
    got = []
    while len(got) < len(after) - 2 * MB:  # stop before the end of what the reference read
        got += examples_of(next(it))
    assert got == after[:len(got)] and seen[-1] != got[0]


# ----------------------------------------------------------------------------- fine-tuning (train.packing)

def _ft_items(task_type: str, pair_mode: str = "joint", n: int = 5, seed: int = 3):
    from megamlm.finetune.data import Encoded

    g = torch.Generator().manual_seed(seed)
    items = []
    for k in range(n):
        L = int(torch.randint(3, 15, (1,), generator=g))
        ids = torch.randint(5, 90, (L,), generator=g).numpy()
        ids[0] = 2
        types = (torch.arange(L) >= L // 2).long().numpy() if task_type == "pair" and pair_mode == "joint" \
            else np.zeros(L, dtype=np.int64)
        if task_type == "token":
            labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
            first = np.arange(1, L - 1, 2)
            labels[first] = torch.randint(0, 3, (first.size,), generator=g).numpy()
            items.append(Encoded(ids, types, labels, first_piece=first, n_words=first.size))
            continue
        e = Encoded(ids, types, np.array(k % 3))
        if pair_mode == "concat":
            e.ids_b = torch.randint(5, 90, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).numpy()
            e.ids_b[0] = 2
        items.append(e)
    return items


@pytest.mark.parametrize("task_type,pair_mode", [("sequence", "joint"), ("pair", "joint"), ("pair", "concat"),
                                                 ("token", "joint")])
def test_a_packed_finetuning_batch_gives_each_examples_logits_loss_and_gradients(task_type, pair_mode):
    """train.packing: the examples in one row give, per example, the padded batch's logits (fp32, within
    1e-5), the same loss sum and count and the same gradients, for every head."""
    from megamlm.finetune.data import collate
    from megamlm.finetune.heads import FinetuneModel
    from megamlm.model.encoder import Encoder

    torch.manual_seed(0)
    enc = Encoder(100, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_position_embeddings=16,
                  dropout=0.0, attention_dropout=0.0)
    model = FinetuneModel(enc, task_type, 3, pair_mode=pair_mode, dropout=0.0)
    items = _ft_items(task_type, pair_mode)
    padded, packed = collate(items), collate(items, packed=True)
    assert packed.attention_mask is None and packed.input_ids.shape == (1, sum(len(e.ids) for e in items))
    outs, grads = [], []
    for b in (padded, packed):
        model.zero_grad()
        out = model(b)
        out.loss_sum.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (a, p) = outs
    if task_type == "token":  # per example: its rows of the packed logits against its padded row
        cu = packed.segments.cu_seqlens.tolist()
        for j, e in enumerate(items):
            torch.testing.assert_close(p.logits[0, cu[j]:cu[j + 1]], a.logits[j, :len(e.ids)], atol=1e-5, rtol=1e-5)
    else:
        assert p.logits.shape == a.logits.shape == (len(items), 3)
        torch.testing.assert_close(p.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert int(p.n_targets) == int(a.n_targets) > 0
    torch.testing.assert_close(p.loss_sum, a.loss_sum, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def test_an_example_longer_than_the_budget_is_a_named_error_not_a_hang(shards, tok):
    """The config refuses data.micro_batch_tokens < data.seq_len; a loader built around that check (here
    by replacing the field after validation) still stops with an error naming the key."""
    import dataclasses

    from megamlm.data.shard_format import ShardError

    dcfg = dataclasses.replace(F.loader_config(shards, packing=True), micro_batch_tokens=16)
    loader = build_loader(dcfg, tok, single_process_topology(), 5, F.objective())
    with pytest.raises(ShardError, match="exceeds data.micro_batch_tokens=16"):
        next(iter(loader))
