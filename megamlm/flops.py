"""FLOP and peak accounting: the needed FLOPs of a training step and the device's measured matmul peak,
the two halves of MFU. Used by the trainer (``train/mfu``), ``megamlm pretrain`` (the peak) and
``megamlm bench`` alike; below the trainer in the stack (it imports torch only).

Needed FLOPs (:func:`train_flops`) are 3 × the forward matmul FLOPs (backward = 2 × forward):

    per layer, per real token:  2·(3H·H + H·H + 2·H·F)   (qkv, out, up, down)
    per layer, per sequence:    4·L²·H                   (QKᵀ and A·V over the L real tokens)
    per masked row:             2·H·H + 2·H·V_real        (MLM transform, decoder)
    per sequence (pair head):   2·H·H + 2·H·2             (pooler, classifier)

ELECTRA (``generator`` = its width Hg, blocks Lg, feed-forward Fg): the discriminator's layers as above, its
head 2·H·H + 2·H per real token; the generator's layers at width Hg, its projection 2·H·Hg per real token
(when Hg ≠ H), and per masked row 2·Hg·H + 2·H·V_real (its MLM head back to the embedding width, the
decoder); sampling counts 0.

Embedding lookups, norms, activations and softmax count 0; padding counts 0 (it is not needed work),
nor does a vocabulary projection of unmasked rows. Two denominators:

* :func:`matmul_peak`, the best rate of a large square matmul in the training dtype, timed on the device
  the run trains on (``train/mfu``; the only one on a CPU). It is what this device reaches, so it reads
  higher than the datasheet figure (an H100's 4096³ bf16 GEMM runs well below 989 TFLOP/s).
* :func:`datasheet_peak`, the vendor's dense tensor-core figure for the detected GPU and precision
  (``train/mfu_datasheet``), the denominator Megatron-LM, MosaicBERT and ModernBERT report against.
"""

from __future__ import annotations

import time

import torch

__all__ = ["train_flops", "generator_flops_shape", "matmul_peak", "sync", "datasheet_peak", "device_datasheet_peak", "DATASHEET_PEAKS"]

# Dense (no structured sparsity) peaks per GPU from NVIDIA's datasheets, TFLOP/s, by the name torch reports
# (torch.cuda.get_device_name). First match wins: the more specific names come first. fp32 is the plain
# (non-tensor-core) rate; tf32 applies to fp32 training with TF32 matmuls allowed.
DATASHEET_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),  # A10 and A10G
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # SXM2; no bf16
)


def datasheet_peak(device_name: str, precision: str, tf32: bool = False) -> float:
    """The datasheet's dense FLOP/s of ``device_name`` (as torch names it) in ``precision`` (bf16, fp16,
    fp32; ``tf32``: fp32 matmuls run as TF32); 0.0 for a device or precision the table does not know."""
    key = "tf32" if precision == "fp32" and tf32 else precision
    for pattern, peaks in DATASHEET_PEAKS:
        if pattern in device_name:
            return peaks.get(key, 0.0) * 1e12
    return 0.0


def device_datasheet_peak(device, precision: str) -> float:
    """:func:`datasheet_peak` of a CUDA ``device`` (TF32 as torch is set to use it); 0.0 for any other."""
    if not str(device).startswith("cuda"):
        return 0.0
    return datasheet_peak(torch.cuda.get_device_name(device), precision, tf32=torch.backends.cuda.matmul.allow_tf32)


def _layers_flops(lengths: torch.Tensor, n_tok: float, width: int, layers: int, ffn: int) -> float:
    return layers * (n_tok * 2 * (4 * width * width + 2 * width * ffn) + float((4 * lengths ** 2 * width).sum()))


def train_flops(batch, hidden: int, num_layers: int, ffn: int, real_vocab: int, pair: bool,
                generator: tuple[int, int, int] | None = None) -> float:
    """Needed training FLOPs of one step on ``batch`` (formula in the module docstring), padded or
    packed (a sequence is an example); ``generator`` (width, blocks, feed-forward width): an ELECTRA step.
    Reads the batch's attention mask or its segments: give it the host batch (on a device tensor it is a
    sync)."""
    H = hidden
    segments = getattr(batch, "segments", None)
    if segments is not None:
        lengths = segments.lengths().double()  # [E]
    else:
        lengths = batch.attention_mask.sum(dim=1).double()  # [B]
    n_tok = float(lengths.sum())
    n_masked = float(batch.mlm_positions.numel())
    fwd = _layers_flops(lengths, n_tok, H, num_layers, ffn)
    if generator is None:
        fwd += n_masked * (2 * H * H + 2 * H * real_vocab)
    else:
        width, layers, g_ffn = generator
        fwd += n_tok * (2 * H * H + 2 * H)  # the discriminator's head
        fwd += _layers_flops(lengths, n_tok, width, layers, g_ffn) + (n_tok * 2 * H * width if width != H else 0.0)
        fwd += n_masked * (2 * width * H + 2 * H * real_vocab)
    if pair:
        fwd += lengths.numel() * (2 * H * H + 4 * H)
    return 3.0 * fwd


def generator_flops_shape(model_cfg, objective_cfg) -> tuple[int, int, int] | None:
    """The ``generator`` argument of :func:`train_flops` for these config sections (None unless ELECTRA)."""
    if getattr(objective_cfg, "name", "mlm") != "electra":
        return None
    width, layers, _, ffn = objective_cfg.generator_shape(model_cfg.hidden_size, model_cfg.num_layers)
    return width, layers, ffn


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), before reading a clock."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 6, device: str = "cpu") -> float:
    """Best FLOP/s of an n×n×n matmul in ``dtype`` (the denominator of MFU)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 2):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best
