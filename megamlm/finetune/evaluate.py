"""Evaluation of a fine-tuned model on a split: every rank predicts its share, the predictions are
gathered, and the metrics (classification, or entity-level for token tasks) come from all of them."""

from __future__ import annotations

import torch

from megamlm.finetune import data as D
from megamlm.finetune.config import FinetuneConfig
from megamlm.finetune.metrics import classification_metrics, entity_prf

__all__ = ["Evaluator"]


class Evaluator:
    """Predictions over a split on every rank's share, gathered, turned into metrics."""

    def __init__(self, cfg: FinetuneConfig, encoded, examples, labels, device, world_size, rank):
        self.cfg, self.enc, self.ex, self.labels = cfg, encoded, examples, labels
        self.device, self.world, self.rank = device, world_size, rank

    @torch.no_grad()
    def __call__(self, module) -> dict[str, float]:
        was = module.training
        module.eval()
        idx = list(range(self.rank, len(self.enc), self.world))
        preds: dict[int, object] = {}
        loss_sum, n = 0.0, 0
        bs = self.cfg.train.eval_batch_size
        for s in range(0, len(idx), bs):
            chunk = idx[s: s + bs]
            batch = D.collate([self.enc[i] for i in chunk], packed=self.cfg.train.packing)
            out = module(batch.to(self.device))
            loss_sum += float(out.loss_sum)
            n += int(out.n_targets)
            am = out.logits.argmax(-1).cpu().numpy()
            starts = None if batch.segments is None else batch.segments.cu_seqlens.tolist()
            for j, i in enumerate(chunk):
                if self.cfg.task.type == "token":
                    row = am[j] if starts is None else am[0][starts[j]:starts[j + 1]]  # this example's pieces
                    preds[i] = row[self.enc[i].first_piece].tolist()
                else:
                    preds[i] = int(am[j])
        module.train(was)
        if self.world > 1:
            import torch.distributed as dist

            gathered = [None] * self.world
            dist.all_gather_object(gathered, (preds, loss_sum, n))
            preds, loss_sum, n = {}, 0.0, 0
            for p, ls, c in gathered:
                preds.update(p)
                loss_sum += ls
                n += c
        m = self.metrics(preds)
        m["loss"] = loss_sum / max(n, 1)
        return m

    def metrics(self, preds: dict[int, object]) -> dict[str, float]:
        L = self.labels
        if self.cfg.task.type == "token":
            gold = [list(self.ex[i].label) for i in range(len(self.ex))]
            pred = [[L[k] for k in preds[i]] + ["O"] * (self.enc[i].n_words - len(preds[i]))
                    for i in range(len(self.ex))]
            return entity_prf(gold, pred)
        gold = [self.ex[i].label for i in range(len(self.ex))]
        return classification_metrics(gold, [L[preds[i]] for i in range(len(self.ex))])
