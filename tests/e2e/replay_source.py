"""A deterministic batch source for engine tests: S logical streams of synthetic MLM/NSP batches.

Stream s yields the same batches wherever it runs, so a step's global batch is the same set of
sequences for data-parallel 2 × accumulation 1 and data-parallel 1 × accumulation 2: each rank reads
streams ``dp_rank + dp_size * j`` for its micro-batches j. That isolates the engine's arithmetic
(loss scaling over ranks and micro-batches) from the loader's sharding.
"""

from __future__ import annotations

import torch

from megamlm.data.batch import Batch


class ReplaySource:
    def __init__(self, topo, state, accumulation: int, vocab: int = 300, batch: int = 8, seq: int = 32):
        self.topo, self.acc, self.vocab, self.B, self.T = topo, accumulation, vocab, batch, seq
        self.k = (state or {}).get("k", 0)
        self.stats = {"dropped_batches": 0}

    def batch(self, stream: int, index: int) -> Batch:
        g = torch.Generator().manual_seed(100_003 * index + stream)
        B, T = self.B, self.T
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        ids = torch.randint(5, self.vocab, (B, T), generator=g) * mask
        cand = torch.nonzero(mask.view(-1)).view(-1)
        n = max(1, int(0.15 * cand.numel()) + int(torch.randint(0, 5, (1,), generator=g)))
        pos = cand[torch.randperm(cand.numel(), generator=g)[:n]].sort().values
        labels = torch.full((B * T,), -100, dtype=torch.long)
        labels[pos] = ids.view(-1)[pos]
        inp = ids.clone().view(-1)
        inp[pos] = 4  # [MASK]
        return Batch(inp.view(B, T), torch.zeros_like(ids), mask, labels.view(B, T), pos, ids.view(-1)[pos],
                     torch.randint(0, 2, (B,), generator=g), int(mask.sum()))

    def __iter__(self):
        while True:
            step, j = divmod(self.k, self.acc)
            stream = self.topo.dp_rank + self.topo.dp_size * j
            self.k += 1
            yield self.batch(stream, step)

    def state_dict(self) -> dict:
        return {"k": self.k}
