"""LAMB with its trust ratio per tensor (You et al. 2020, "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes", Algorithm 2), as NVIDIA's BERT recipe runs it (apex ``FusedLAMB``):

    m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
    u ← m̂ / (√v̂ + ε) + λ·w      (m̂, v̂ bias-corrected)
    r ← ‖w‖ / ‖u‖ for a tensor with weight decay λ > 0 (1 when either norm is 0; 1 for tensors without
        decay, the biases and LayerNorm parameters, as apex does unless ``use_nvlamb``)
    w ← w − lr · r · u

Each tensor of a parameter group is its own layer for the trust ratio, which is what makes it LAMB: an
optimizer handed DeepSpeed's flat ZeRO partitions (many tensors in one, cut anywhere) cannot compute it,
so LAMB runs only where the optimizer sees whole tensors (ZeRO stage 0; ``engine.lamb_problems``).
Gradient clipping and the non-finite guard come from the engine's wrapper, as for AdamW.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Lamb"]


class Lamb(torch.optim.Optimizer):
    """LAMB over whole tensors (module docstring); foreach kernels, any device, state in fp32 like the
    parameters it updates (DeepSpeed's fp32 master copies under bf16 / fp16)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LAMB: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        b1, b2 = group["betas"]
        grads = [p.grad for p in params]
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(m, grads, 1.0 - b1)  # m ← β1·m + (1−β1)·g
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
        step = self.state[params[0]]["step"]  # a group's tensors step together
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1.0 - b2 ** step))
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(m, denom)
        torch._foreach_div_(update, 1.0 - b1 ** step)
        wd = group["weight_decay"]
        if wd > 0:
            torch._foreach_add_(update, params, alpha=wd)
            w_norm = torch.stack(torch._foreach_norm(params))
            u_norm = torch.stack(torch._foreach_norm(update))
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            for u, r in zip(update, ratio.unbind()):  # per tensor, on the device: no host read
                u.mul_(r)
        torch._foreach_add_(params, update, alpha=-group["lr"])
