"""A megamlm checkpoint folder (any ZeRO stage, any vocab-parallel size, fp32 or bf16) → one full fp32
state dict, offline on CPU, with no process group.

Files are read with ``torch.load(weights_only=True)``; DeepSpeed's optimizer files need three of its
plain classes allowed by name (:data:`DS_SAFE_GLOBALS`), nothing else. DeepSpeed's own ``zero_to_fp32``
loads with ``weights_only=False`` and treats every ``*_optim_states.pt`` of a folder as one
data-parallel group, so we parse the files ourselves (safely, one vocab-parallel rank at a time) and hand
them to its merge functions (``_get_fp32_state_dict_from_zero{2,3}_checkpoint``): the consolidation
arithmetic (ZeRO-2 alignment padding, ZeRO-3 per-parameter partitions) stays DeepSpeed's.

Vocab-parallel checkpoints (``vocab_parallel.json``): each ``mp_rank_XX`` is consolidated alone, then the
``sharded`` tensors are concatenated along their dim in mp-rank order; replicated tensors must agree.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path

import torch

from megamlm.errors import MegamlmError

log = logging.getLogger(__name__)

__all__ = ["ConvertError", "safe_load", "resolve_checkpoint", "consolidate", "materialize", "DS_SAFE_GLOBALS"]

DS_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_Z3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


class ConvertError(MegamlmError, ValueError):
    """A checkpoint or model directory cannot be converted; the message names the file and the key."""


def _safe_globals() -> list:
    import importlib

    out = []
    for name in DS_SAFE_GLOBALS:
        mod, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: the load names what it lacks
            pass
    return out


def safe_load(path: Path, deepspeed_classes: bool = False, mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` (optionally allowing DeepSpeed's plain classes); a clear error
    for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: file is missing")
    try:
        ctx = torch.serialization.safe_globals(_safe_globals()) if deepspeed_classes else contextlib.nullcontext()
        with ctx:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError / UnpicklingError / EOFError / zip errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: cannot be read as a weights-only checkpoint (truncated, corrupt or "
                           f"holding code objects?): {type(e).__name__}: {first[:300]}") from None


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """A megamlm checkpoint folder (with ``latest``) or one of its tag folders → the complete tag folder."""
    from megamlm.checkpoint import COMPLETE, read_latest

    p = Path(path)
    if tag:
        p = p / tag
    elif (p / "latest").is_file():
        t = read_latest(p)
        p = p / t
    if not p.is_dir():
        raise ConvertError(f"{p}: no such checkpoint folder")
    if not (p / COMPLETE).is_file():
        raise ConvertError(f"{p}: not a complete megamlm checkpoint (no {COMPLETE} marker; a folder with "
                           "`latest` or a stepNNNNNNNN folder is expected)")
    return p


def materialize(x) -> torch.Tensor:
    """A tensor, or a lazy ZeRO-3 tensor (DeepSpeed's ``GatheredTensor``) gathered now."""
    return x if isinstance(x, torch.Tensor) else x.contiguous()


def _ds_merge(stage: int, model_states: list[dict], optim: list[dict], where: str,
              lazy: bool = False) -> dict[str, torch.Tensor]:
    """DeepSpeed's own ZeRO 1/2/3 merge over already-loaded files of one mp rank. ``lazy``: at stage 3,
    DeepSpeed's ``GatheredTensor`` objects (shape, dtype; ``.contiguous()`` gathers one parameter), so a
    writer can hold one full tensor at a time (see :func:`materialize`)."""
    from deepspeed.utils import zero_to_fp32 as z

    zstates = []
    for sd in model_states:
        names = sd.get(z.BUFFER_NAMES) or []
        buffers = {k: v.float() if v.is_floating_point() else v for k, v in sd["module"].items() if k in names}
        zstates.append(z.zero_model_state(buffers=buffers, param_shapes=sd[z.PARAM_SHAPES],
                                          shared_params=[[k, v] for k, v in sd["shared_params"].items()],
                                          ds_version=sd.get(z.DS_VERSION), frozen_param_shapes=sd.get(z.FROZEN_PARAM_SHAPES),
                                          frozen_param_fragments=sd.get(z.FROZEN_PARAM_FRAGMENTS)))
    osd = [o[z.OPTIMIZER_STATE_DICT] for o in optim]
    key = z.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else z.FP32_FLAT_GROUPS
    groups = [o[key] for o in osd]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if stage <= 2:
                sd = z._get_fp32_state_dict_from_zero2_checkpoint(len(optim), groups, zstates, False,
                                                                  osd[0].get(z.PARAM_ALIGNMENT_PADDINGS))
            else:
                sd = z._get_fp32_state_dict_from_zero3_checkpoint(len(optim), groups, zstates, False)
                if lazy:
                    return dict(sd)
                sd = z.to_torch_tensor(sd)
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
        raise ConvertError(f"{where}: DeepSpeed could not consolidate the ZeRO-{stage} partitions: {e}") from None
    log.debug("zero_to_fp32: %s", buf.getvalue().strip())
    # fp32 already (DeepSpeed builds each full tensor anew): no second copy of the model
    return {k: v.detach().float() for k, v in sd.items()}


def _stage0_fp32(ms: dict, where: str) -> dict[str, torch.Tensor]:
    """Stage 0: the module; in a bf16 run its fp32 master copies (``optimizer.fp32_groups``) when they
    map one-to-one onto the parameters (checked: each master rounds to the saved bf16 tensor)."""
    module = ms["module"]
    out = {k: v.float() for k, v in module.items()}
    low = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
    groups = (ms.get("optimizer") or {}).get("fp32_groups") if isinstance(ms.get("optimizer"), dict) else None
    if not low:
        return out
    if groups:
        seen, params = set(), []
        for k, v in module.items():  # unique tensors in module order (tied ones once)
            if v.data_ptr() in seen:
                continue
            seen.add(v.data_ptr())
            params.append(k)
        order = [k for k in params if module[k].dim() >= 2] + [k for k in params if module[k].dim() < 2]
        flat = [t for g in groups for t in g]
        if len(flat) == len(order) and all(
                t.shape == module[k].shape and torch.equal(t.to(module[k].dtype), module[k]) for t, k in zip(flat, order)):
            out.update({k: t.float().clone() for k, t in zip(order, flat)})
            for k, v in module.items():  # tied duplicates follow their source
                for k2 in order:
                    if k not in order and module[k2].data_ptr() == v.data_ptr():
                        out[k] = out[k2]
            return out
    log.warning("%s: stage-0 %s run without matching fp32 master weights: exporting the %s weights upcast to "
                "fp32", where, module[low[0]].dtype, module[low[0]].dtype)
    return out


def _consolidate_mp_rank(folder: Path, r: int, stage: int, lazy: bool = False) -> dict[str, torch.Tensor]:
    files = sorted(p.name for p in folder.iterdir())
    optim = {}
    for name in files:
        m = _OPTIM_RE.match(name)
        if m and int(m.group(2)) == r:
            optim[int(m.group(1))] = folder / name
    if stage == 0 or not optim:
        if stage >= 1:
            raise ConvertError(f"{folder}: config says ZeRO stage {stage} but no *_mp_rank_{r:02d}_optim_states.pt "
                               "files are present: the fp32 partitions are missing")
        f = folder / f"mp_rank_{r:02d}_model_states.pt"
        return _stage0_fp32(safe_load(f, deepspeed_classes=True), str(f))
    # Memory-mapped: only the fp32 partitions are read from disk, never the Adam moments beside them.
    first = safe_load(optim[min(optim)], deepspeed_classes=True, mmap=True)
    osd = first.get("optimizer_state_dict", {})
    pc = osd.get("partition_count")
    dp = max(pc) if isinstance(pc, (list, tuple)) else int(pc) if pc is not None else len(optim)
    missing = [d for d in range(dp) if d not in optim]
    if missing or len(optim) != dp:
        pattern = optim[min(optim)].name.replace(f"zero_pp_rank_{min(optim)}_", "zero_pp_rank_{d}_")
        raise ConvertError(f"{folder}: ZeRO partition files missing for mp rank {r}: expected data-parallel ranks "
                           f"0..{dp - 1} ({pattern}), found {sorted(optim)}; missing {missing}")
    saved_stage = int(osd.get("zero_stage", stage))
    if saved_stage != stage and not (stage in (1, 2) and saved_stage in (1, 2)):
        log.warning("%s: optimizer files say ZeRO stage %d, config.yaml says %d; using %d", folder, saved_stage,
                    stage, saved_stage)
    stage = saved_stage
    optim_sds = [first] + [safe_load(optim[d], deepspeed_classes=True, mmap=True) for d in range(1, dp)] \
        if min(optim) == 0 else [safe_load(optim[d], deepspeed_classes=True, mmap=True) for d in range(dp)]
    if stage <= 2:
        model_files = [folder / f"mp_rank_{r:02d}_model_states.pt"]
    else:
        model_files = [folder / f"zero_pp_rank_{d}_mp_rank_{r:02d}_model_states.pt" for d in range(dp)]
    model_sds = [safe_load(f, deepspeed_classes=True) for f in model_files]
    return _ds_merge(stage, model_sds, optim_sds, f"{folder} (mp rank {r})", lazy)


def consolidate(folder: Path, zero_stage: int, lazy: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 state dict with the padded vocabulary, the vocab-parallel layout) of one tag folder.
    ``lazy``: ZeRO-3 tensors stay DeepSpeed's lazy ``GatheredTensor`` (see :func:`materialize`) except the
    vocab-parallel ones, which are joined here."""
    layout_file = folder / "vocab_parallel.json"
    layout = {"vocab_parallel_size": 1, "sharded": {}}
    if layout_file.is_file():
        try:
            layout = json.loads(layout_file.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{layout_file}: not valid JSON ({e})") from None
    vp = int(layout.get("vocab_parallel_size", 1))
    sharded = {k: int(v) for k, v in (layout.get("sharded") or {}).items()}
    from megamlm.parallel.layers import VOCAB_TIED_PARAMS as TIED_ALIASES  # BERT's decoder and ELECTRA's generator's

    per_rank = [_consolidate_mp_rank(folder, r, zero_stage, lazy) for r in range(vp)]
    for p in per_rank:  # tied copies are rebuilt from their source after the merge (ranks differ in listing them)
        for k in TIED_ALIASES:
            p.pop(k, None)
    if vp > 1:
        extra = sorted(p.name for p in folder.glob("*mp_rank_*") if int(re.search(r"mp_rank_(\d+)", p.name).group(1)) >= vp)
        if extra:
            raise ConvertError(f"{layout_file} says vocab_parallel_size={vp} but {folder} also holds {extra[:3]}")
    full: dict[str, torch.Tensor] = {}
    for k, v in per_rank[0].items():
        if k in sharded:
            shapes = [tuple(p[k].shape) for p in per_rank]
            try:
                full[k] = torch.cat([materialize(p[k]) for p in per_rank], dim=sharded[k])
            except RuntimeError:
                raise ConvertError(f"{folder}: vocab-sharded {k} has incompatible shards {shapes}") from None
            continue
        for r, p in enumerate(per_rank[1:], 1):
            if k not in p:
                raise ConvertError(f"{folder}: mp rank {r} lacks {k} (present on mp rank 0)")
            if p[k].shape != v.shape or not torch.equal(materialize(p[k]), materialize(v)):
                raise ConvertError(f"{folder}: replicated tensor {k} differs between mp rank 0 {tuple(v.shape)} and "
                                   f"mp rank {r} {tuple(p[k].shape)}")
        full[k] = v
    for r, p in enumerate(per_rank[1:], 1):
        extra = sorted(set(p) - set(per_rank[0]))
        if extra:
            raise ConvertError(f"{folder}: mp rank {r} has tensors mp rank 0 lacks: {extra[:5]}")
    for k, src in TIED_ALIASES.items():
        if src in full and k.replace(".weight", ".bias") in full:  # the decoder this model has
            full[k] = full[src]
    return full, layout
