"""Evaluation metrics: accuracy and macro-F1 for classification; entity-level precision / recall / F1
for BIO tagging (CoNLL-2000 ``conlleval`` chunking, the default mode of seqeval: an I- tag that does not
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


def _split(tag: str) -> tuple[str, str]:
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, typ = tag.partition("-")
    return prefix, typ


def bio_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end inclusive) of each entity in one sentence's BIO tags (conlleval chunking)."""
    out = set()
    start, cur = None, ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, typ = _split(tag)
        ends = start is not None and (prefix in ("O", "B") or typ != cur)
        if ends:
            out.add((cur, start, i - 1))
            start, cur = None, ""
        if prefix == "B" or (prefix == "I" and start is None):
            start, cur = i, typ
    return out


def entity_prf(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 over entities (exact type and span) of all sentences."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    tp = n_gold = n_pred = 0
    correct_tags = total_tags = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        ge, pe = bio_entities(g), bio_entities(p)
        tp += len(ge & pe)
        n_gold += len(ge)
        n_pred += len(pe)
        correct_tags += sum(a == b for a, b in zip(g, p))
        total_tags += len(g)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "accuracy": correct_tags / max(total_tags, 1),
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
