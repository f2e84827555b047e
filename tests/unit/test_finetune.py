"""Fine-tuning parts without a process group: heads against hand computations, frozen vs full
training, metrics, readers and their errors, the config file type, HF export parity.

A failure points at megamlm/finetune/heads.py (formulas, −100 handling, freezing), metrics.py (entity
chunking), data.py (readers, label checks, encoding), config.py (schema / validation) or export.py (the
key table use, pooler / classifier names, id2label).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megamlm.config import ConfigError
from megamlm.finetune import data as D
from megamlm.finetune.config import TaskConfig, finetune_config_from_dict, load_finetune_config
from megamlm.finetune.heads import IGNORE_INDEX, FinetuneModel, FtBatch, param_groups
from megamlm.finetune.metrics import bio_entities, entity_prf, macro_f1, seed_summary
from megamlm.model.encoder import Encoder

ROOT = Path(__file__).resolve().parents[2]
H, V = 16, 50


def tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(V, hidden_size=H, num_layers=1, num_heads=2, ffn_size=32, max_position_embeddings=16,
                   dropout=0.0, attention_dropout=0.0)


def batch(B=3, T=6, token=False, concat=False) -> FtBatch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    labels = torch.randint(0, 3, (B, T) if token else (B,), generator=g)
    if token:
        labels[:, 0] = IGNORE_INDEX
        labels[0, 4:] = IGNORE_INDEX
        labels[1, 2] = IGNORE_INDEX
    b = FtBatch(ids, torch.zeros_like(ids), mask, labels)
    if concat:
        b.input_ids_b, b.token_type_ids_b, b.attention_mask_b = ids.flip(1), torch.zeros_like(ids), mask.flip(1)
    return b


# ------------------------------------------------------------------ heads: the textbook formulas by hand

def test_sequence_head_is_softmax_of_cls_times_w():
    m = FinetuneModel(tiny_encoder(), "sequence", 3, pooler=False, dropout=0.0).eval()
    b = batch()
    out = m(b)
    h = m.encoder(b.input_ids, b.token_type_ids, b.attention_mask)[:, 0]  # [B, H]
    W, c = m.head.classifier.weight, m.head.classifier.bias  # [K, H], [K]
    logits = h @ W.T + c
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-6)
    p = torch.softmax(logits, -1)
    hand = -sum(math.log(p[i, b.labels[i]].item()) for i in range(3))
    assert out.n_targets.item() == 3
    assert abs(out.loss_sum.item() - hand) < 1e-5


def test_pair_concat_head_uses_both_cls_vectors():
    m = FinetuneModel(tiny_encoder(), "pair", 2, pair_mode="concat", pooler=False, dropout=0.0).eval()
    b = batch(concat=True)
    b.labels = b.labels % 2
    out = m(b)
    ha = m.encoder(b.input_ids, b.token_type_ids, b.attention_mask)[:, 0]
    hb = m.encoder(b.input_ids_b, b.token_type_ids_b, b.attention_mask_b)[:, 0]
    assert m.head.classifier.weight.shape == (2, 2 * H)  # W_P ∈ R^{2d×K}, stored [K, 2d]
    logits = torch.cat([ha, hb], -1) @ m.head.classifier.weight.T + m.head.classifier.bias
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-6)
    hand = F.cross_entropy(logits, b.labels, reduction="sum")
    assert abs(out.loss_sum.item() - hand.item()) < 1e-5


def test_token_head_averages_over_labelled_tokens_only():
    m = FinetuneModel(tiny_encoder(), "token", 3, dropout=0.0).eval()
    b = batch(token=True)
    out = m(b)
    assert out.logits.shape == (3, 6, 3)
    h = m.encoder(b.input_ids, b.token_type_ids, b.attention_mask)
    logits = h @ m.head.classifier.weight.T + m.head.classifier.bias  # y_i = softmax(h_i W_K)
    logp = torch.log_softmax(logits, -1)
    keep = b.labels != IGNORE_INDEX
    hand = -sum(logp[i, t, b.labels[i, t]].item() for i in range(3) for t in range(6) if keep[i, t])
    assert out.n_targets.item() == int(keep.sum()) == 18 - 3 - 2 - 1
    assert abs(out.loss_sum.item() - hand) < 1e-5
    assert torch.equal(out.logits.argmax(-1), logits.argmax(-1))  # prediction t_i = argmax y_i


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_encoder_is_bit_identical_full_changes(frozen):
    m = FinetuneModel(tiny_encoder(), "sequence", 3, dropout=0.1)
    if frozen:
        m.freeze_encoder()
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    head_before = m.head.classifier.weight.clone()
    opt = torch.optim.AdamW(param_groups(m, 1e-2, 1e-2, 0.01))
    for _ in range(3):
        out = m(batch())
        (out.loss_sum / out.n_targets).backward()
        opt.step()
        opt.zero_grad()
    after = m.encoder.state_dict()
    same = [torch.equal(before[k], after[k]) for k in before]
    assert all(same) if frozen else not any(same[:1]) and sum(same) < len(same) // 4
    assert not torch.equal(head_before, m.head.classifier.weight)
    if frozen:
        assert all(g["params"][0] not in set(m.encoder.parameters()) for g in opt.param_groups)


def test_param_groups_carry_two_learning_rates():
    m = FinetuneModel(tiny_encoder(), "token", 3)
    lrs = {g["lr"] for g in param_groups(m, 1e-4, 1e-3, 0.01)}
    assert lrs == {1e-4, 1e-3}


# ------------------------------------------------------------------ metrics

def test_bio_entities_conlleval_chunking():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "O"]
    assert bio_entities(tags) == {("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("ORG", 6, 6)}


def test_entity_prf_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-LOC"]]
    m = entity_prf(gold, pred)  # 1 of 2 predicted correct, 1 of 3 gold found
    assert m["precision"] == 0.5 and abs(m["recall"] - 1 / 3) < 1e-12 and abs(m["f1"] - 0.4) < 1e-12


def test_entity_prf_counts_and_zero_cases():
    gold = [["B-PER", "I-PER", "O", "I-LOC", "B-LOC"], ["B-ORG", "I-ORG", "I-PER", "O"]]
    pred = [["B-PER", "O", "O", "I-LOC", "B-LOC"], ["B-ORG", "I-ORG", "B-PER", "O"]]
    m = entity_prf(gold, pred)  # gold: PER LOC LOC ORG PER; pred: PER LOC LOC ORG PER, 4 of 5 exact (PER span)
    assert (m["entities_gold"], m["entities_pred"]) == (5, 5)
    assert abs(m["precision"] - 0.8) < 1e-12 and abs(m["recall"] - 0.8) < 1e-12
    none = entity_prf([["O", "O"]], [["O", "O"]])  # no entity anywhere: 0, not a division error
    assert none["f1"] == 0.0 and none["accuracy"] == 1.0
    with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
        entity_prf([["O", "O"]], [["O"]])


def test_macro_f1_and_seed_summary():
    assert abs(macro_f1(["a", "a", "b", "c"], ["a", "b", "b", "b"]) - (2 / 3 + 2 / 4 + 0) / 3) < 1e-12
    s = seed_summary([{"f1": 0.2}, {"f1": 0.5}, {"f1": 0.3}])["f1"]
    assert s["median"] == 0.3 and s["min"] == 0.2 and s["max"] == 0.5


# ------------------------------------------------------------------ readers and bad input

def _task(tmp, text, **kw) -> TaskConfig:
    p = tmp / "data.txt"
    p.write_text(text)
    return TaskConfig(path=str(p), **kw)


def test_empty_file_is_an_error_naming_it(tmp_path):
    for reader, typ in (("conll", "token"), ("tsv", "sequence")):
        t = _task(tmp_path, "\n\n", reader=reader, type=typ)
        with pytest.raises(D.DataError, match=r"data\.txt: empty file"):
            D.read_splits(t, 0.0)


def test_token_tag_count_mismatch_names_file_and_line(tmp_path):
    t = _task(tmp_path, "a b\tO O\nx y z\tO B-LOC\n", reader="tsv", type="token")
    with pytest.raises(D.DataError, match=r"data\.txt:2: 3 tokens but 2 tags"):
        D.read_splits(t, 0.0)
    t = _task(tmp_path, "a\tO\nb\tB-LOC\textra\n", reader="conll", type="token")
    with pytest.raises(D.DataError, match=r"data\.txt:2: 3 field"):
        D.read_splits(t, 0.0)
    t = _task(tmp_path, "a\tO\nb\tLOC\n", reader="conll", type="token")
    with pytest.raises(D.DataError, match=r"data\.txt:2: tag 'LOC' is not BIO"):
        D.read_splits(t, 0.0)


def test_unknown_label_at_evaluation_names_file_and_line(tmp_path):
    lines = [f"{'pos' if i % 2 else 'neg'}\ttext number {i}" for i in range(60)] + ["weird\tan odd one"]
    t = _task(tmp_path, "\n".join(lines) + "\n", reader="tsv", type="sequence", labels=["neg", "pos"])
    splits = D.read_splits(t, 0.0)
    assert sum(len(v) for v in splits.values()) == 61  # nothing dropped
    l2i = {"neg": 0, "pos": 1}
    which = next(s for s, exs in splits.items() if any(e.label == "weird" for e in exs))

    class Tok:
        special = type("S", (), {"cls": 2, "sep": 3, "unk": 1})

        @staticmethod
        def encode(s):
            return [5 + len(w) for w in s.split()]

    with pytest.raises(D.DataError, match=r"data\.txt:61: label 'weird' \(" + which + r" split\)"):
        D.encode_split(splits[which], Tok, t, l2i, which)


def test_wnut16_reader_and_deterministic_split():
    try:
        D.wnut16_path()
    except D.DataError as e:
        pytest.skip(str(e))
    t = TaskConfig(type="token", reader="wnut16")
    s1, s2 = D.read_splits(t, 0.0), D.read_splits(t, 0.0)
    assert sum(len(v) for v in s1.values()) == 2394
    assert [e.where for e in s1["test"]] == [e.where for e in s2["test"]]
    labels = D.label_names(t, s1)
    assert len(labels) == 21 and labels[0] == "O"  # 10 entity types × B/I + O


# ------------------------------------------------------------------ config file type

def test_shipped_finetune_configs_validate():
    files = sorted((ROOT / "configs").glob("finetune/*.yaml"))
    assert len(files) == 3
    for f in files:
        load_finetune_config(f)


def test_config_errors_are_collected_and_named():
    with pytest.raises(ConfigError) as e:
        finetune_config_from_dict({"init": {"checkpoint": "x"}, "task": {"type": "token", "reader": "wiki-topic",
                                   "pair_mod": "joint"}, "optim": {"head_lr": 0}, "trian": {}})
    msg = str(e.value)
    for part in ("'pair_mod' (did you mean 'pair_mode'?)", "section 'trian'", "optim.head_lr=0",
                 "task.reader='wiki-topic' reads sequence data"):
        assert part in msg, msg


# ------------------------------------------------------------------ export to Hugging Face

@pytest.mark.parametrize("task_type", ["sequence", "token"])
def test_export_logits_equal_transformers(tmp_path, task_type):
    transformers = pytest.importorskip("transformers")
    from dataclasses import asdict

    from megamlm.config import ModelConfig
    from megamlm.finetune.config import HeadConfig
    from megamlm.finetune.export import export_hf

    mc = ModelConfig(vocab_size=V, hidden_size=H, num_layers=2, num_heads=2, ffn_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    m = FinetuneModel(Encoder.from_config(mc, V), task_type, 4, dropout=0.1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    labels = ["w", "x", "y", "z"]
    torch.save({"state_dict": m.state_dict(), "model": asdict(mc), "labels": labels,
                "task": asdict(TaskConfig(type=task_type, reader="tsv")), "head": asdict(HeadConfig()),
                "step": 0, "tokenizer": ""}, tmp_path / "model.pt")
    out = export_hf(tmp_path / "model.pt", tmp_path / "hf")
    cls = getattr(transformers, "BertForTokenClassification" if task_type == "token"
                  else "BertForSequenceClassification")
    hf = cls.from_pretrained(str(out)).eval()
    assert hf.config.id2label == dict(enumerate(labels)) and hf.config.label2id["z"] == 3
    b = batch(B=3, T=7)
    with torch.no_grad():
        ours = m.eval().logits(b)
        theirs = hf(input_ids=b.input_ids, token_type_ids=b.token_type_ids,
                    attention_mask=b.attention_mask.long()).logits
    if task_type == "token":
        keep = b.attention_mask
        ours, theirs = ours[keep], theirs[keep]
    assert (ours - theirs).abs().max().item() < 1e-5
    # a second export into the same folder is refused and touches nothing; nothing half-written is left
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    from megamlm.convert import ConvertError

    with pytest.raises(ConvertError, match="not empty"):
        export_hf(tmp_path / "model.pt", out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.pt"]


# ------------------------------------------------------- the run's typed state and the checkpoint's dicts

def test_position_and_eval_record_read_checkpoints_of_the_earlier_code():
    """finetune keeps EpochPosition / EvalTrack and writes them into TrainState.loader / .counters with the
    keys the earlier dict-based code wrote, so its checkpoints resume."""
    from megamlm.finetune.state import EpochPosition, EvalTrack

    old_loader = {"epoch": 2, "index": 7}
    assert EpochPosition.from_state(old_loader) == EpochPosition(2, 7)
    assert EpochPosition.from_state(old_loader).to_state() == old_loader
    fresh = EvalTrack.from_state({"bad_evals": 0})  # what a run wrote before its first evaluation
    assert fresh == EvalTrack() and fresh.to_state() == {"bad_evals": 0, "evals": 0}
    old = {"best": 0.5, "best_loss": 1.25, "best_step": 40, "bad_evals": 1, "evals": 3}
    assert EvalTrack.from_state(old).to_state() == old


def test_eval_track_keeps_the_best_breaks_ties_on_loss_and_stops_on_patience():
    from megamlm.finetune.state import EvalTrack

    t = EvalTrack()
    assert t.record("macro_f1", {"macro_f1": 0.5, "loss": 1.0}, step=10)  # the first is the best
    assert not t.record("macro_f1", {"macro_f1": 0.5, "loss": 1.1}, step=20)  # a tie with a higher loss
    assert t.record("macro_f1", {"macro_f1": 0.5, "loss": 0.9}, step=30)  # a tie with a lower loss
    assert (t.best, t.best_loss, t.best_step, t.bad_evals, t.evals) == (0.5, 0.9, 30, 0, 3)
    assert not t.record("macro_f1", {"macro_f1": 0.4, "loss": 0.1}, step=40) and not t.exhausted(2)
    assert not t.record("macro_f1", {"macro_f1": 0.45, "loss": 0.1}, step=50) and t.exhausted(2)
    assert not t.exhausted(0)  # patience 0: never
    loss = EvalTrack()
    assert loss.record("loss", {"loss": 2.0}, 1) and loss.record("loss", {"loss": 1.0}, 2)
    assert not loss.record("loss", {"loss": 1.5}, 3) and loss.best == 1.0
