"""Evaluation metrics: accuracy and macro-F1 for classification; entity-level precision / recall / F1
for BIO tagging by seqeval (its default CoNLL-2000 ``conlleval`` chunking: an I- tag that does not
continue an entity of its type starts a new one); median and spread over seeds.
"""

from __future__ import annotations

import statistics

__all__ = ["accuracy", "macro_f1", "classification_metrics", "bio_entities", "entity_prf", "seed_summary"]


def accuracy(gold: list, pred: list) -> float:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)


def macro_f1(gold: list, pred: list, labels: list | None = None) -> float:
    """Mean per-class F1 over ``labels`` (default: the classes present in gold or pred); a class with no
    gold and no predicted member is left out, one with either gets F1 0 when nothing matches."""
    classes = list(labels) if labels is not None else sorted(set(gold) | set(pred), key=str)
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)


def classification_metrics(gold: list, pred: list) -> dict[str, float]:
    return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred)}


def _seqeval():
    try:
        from seqeval.metrics.sequence_labeling import get_entities
        from seqeval.metrics import f1_score, precision_score, recall_score
    except ImportError as e:  # pragma: no cover - the `finetune` extra installs it
        raise ImportError("entity-level metrics need seqeval: pip install 'megamlm[finetune]' (or seqeval)") from e
    return get_entities, precision_score, recall_score, f1_score


def bio_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end inclusive) of each entity in one sentence's BIO tags: seqeval's default
    (conlleval) chunking, where an I- tag that does not continue an entity of its type starts a new one."""
    get_entities = _seqeval()[0]
    return set(get_entities(list(tags)))


def entity_prf(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 over entities (exact type and span) of all sentences, computed by
    seqeval (the library the CoNLL / WNUT results are reported with); plus tag accuracy and entity counts."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    get_entities, precision_score, recall_score, f1_score = _seqeval()
    correct_tags = total_tags = n_gold = n_pred = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        n_gold += len(get_entities(list(g)))
        n_pred += len(get_entities(list(p)))
        correct_tags += sum(a == b for a, b in zip(g, p))
        total_tags += len(g)
    gold_l, pred_l = [list(g) for g in gold], [list(p) for p in pred]
    kw = {"zero_division": 0}
    return {"precision": float(precision_score(gold_l, pred_l, **kw)),
            "recall": float(recall_score(gold_l, pred_l, **kw)),
            "f1": float(f1_score(gold_l, pred_l, **kw)), "accuracy": correct_tags / max(total_tags, 1),
            "entities_gold": float(n_gold), "entities_pred": float(n_pred)}


def seed_summary(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """For each metric: median, min, max, population std and the values, over seeds."""
    out = {}
    keys = sorted({k for d in per_seed for k in d})
    for k in keys:
        vals = [d[k] for d in per_seed if k in d]
        out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                  "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "values": vals}
    return out
