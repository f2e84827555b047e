"""Plain references the tests check megamlm against, written from the papers, one tensor at a time."""

from __future__ import annotations

import torch


class ReferenceLamb:
    """LAMB as You et al. 2020 (Algorithm 2) write it, in float64, one tensor at a time, with apex's choice
    of trust ratio 1 for tensors without weight decay: ``step(grads, lr)`` updates ``self.w``."""

    def __init__(self, params, decays, betas=(0.9, 0.999), eps=1e-6):
        self.w = [p.detach().double().clone() for p in params]
        self.decays, self.betas, self.eps = list(decays), betas, eps
        self.m = [torch.zeros_like(x) for x in self.w]
        self.v = [torch.zeros_like(x) for x in self.w]
        self.t = 0

    def step(self, grads, lr: float) -> None:
        b1, b2 = self.betas
        self.t += 1
        t = self.t
        for i, g in enumerate(grads):
            g = g.double()
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            u = (self.m[i] / (1 - b1 ** t)) / ((self.v[i] / (1 - b2 ** t)).sqrt() + self.eps)
            u = u + self.decays[i] * self.w[i]
            ratio = 1.0
            if self.decays[i] > 0 and self.w[i].norm() > 0 and u.norm() > 0:
                ratio = float(self.w[i].norm() / u.norm())
            self.w[i] = self.w[i] - lr * ratio * u
