"""``megamlm bench model``: training-step throughput, MFU and peak memory of megamlm vs HF BERT.

One run times both models on the same config and the same batch, interleaved (round r: megamlm then
HF, then r+1 ...), so drifts in machine speed hit both. Each timed sample is a full training step —
forward, backward, AdamW step (the same optimizer implementation for both) — and tokens/s counts the
*real* (unpadded) tokens. We report median, min–max over rounds and the median ratio.

MFU = needed FLOPs per step / step time / measured peak, where the peak is the best of several large
square matmuls timed in the same process and dtype (:func:`megamlm.flops.matmul_peak`) before every round and after the
last. Each round's step time is set against the better of the two peaks next to it (the machine's
speed drifts over seconds on shared hosts; pairing cancels that, as the per-round ratio does), and
we report the median over rounds with min–max; ``mfu_vs_best_peak`` (median step against the best
peak of the whole run) is the more conservative number, also reported. Needed FLOPs (:func:`megamlm.flops.train_flops`),
3 × the forward matmul FLOPs (backward = 2 × forward):

    per layer, per real token:  2·(3H·H + H·H + 2·H·F)   (qkv, out, up, down)
    per layer, per sequence:    4·L²·H                   (QKᵀ and A·V over the L real tokens)
    per masked row:             2·H·H + 2·H·V_real        (MLM transform, decoder)
    per sequence (pair head):   2·H·H + 2·H·2             (pooler, classifier)

Embedding lookups, norms, activations and softmax count 0. HF does the vocabulary projection on all
B×T rows; that extra work is *not* counted (it is not needed), so both models' MFU use one FLOP count
and their ratio equals the throughput ratio.

Allocator: by default the process runs with glibc tuned as ``megamlm pretrain`` runs on CPU
(``engine.cpu_malloc=tuned``, :func:`megamlm.engine.tune_cpu_malloc`), for both models alike;
``--no-malloc-tuned`` measures glibc's defaults (page faults on re-allocated tensors every step).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps. On CPU each model runs
in a fresh subprocess and we report its peak RSS minus its RSS just before the model is built
(``VmHWM`` − ``VmRSS`` from ``/proc/self/status``, the high-water mark reset first; not ``ru_maxrss``,
which keeps the parent's peak across fork + exec):
weights, gradients, optimizer state, activations and allocator slack.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from megamlm.bench_data import bench_batches, random_batch
from megamlm.bench_electra import ELECTRA_MODELS, electra_flops, electra_loss
from megamlm.flops import device_datasheet_peak, matmul_peak, sync as _sync, train_flops

log = logging.getLogger(__name__)

__all__ = ["BenchOptions", "random_batch", "bench_batches", "train_flops", "matmul_peak", "run_bench", "format_report",
           "bench_model_main", "build_arg_parser", "main", "SMALL"]

# The goal config: hidden 256, 4 layers, 4 heads, FFN 1024, vocab 30522, seq 128, batch 32.
SMALL = dict(hidden_size=256, num_layers=4, num_heads=4, ffn_size=1024)


@dataclass
class BenchOptions:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    ffn_size: int = 1024
    vocab_size: int = 30522
    seq_len: int = 128
    batch_size: int = 32
    mlm_probability: float = 0.15
    padding: bool = False  # lengths uniform in [seq_len/2, seq_len] (one row full) when True
    pair: str = "nsp"
    dropout: float = 0.1
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the megamlm model
    rounds: int = 7
    steps: int = 3  # timed steps per round and model
    warmup: int = 2
    models: str = "megamlm,hf"  # comma list; name[:precision] overrides precision, e.g. "megamlm,hf,hf:fp32"
    memory: bool = True
    malloc_tuned: bool = True  # glibc: heap up to 32 MiB, no trim (both models), as engine.cpu_malloc
    threads: int = 0  # 0 = leave torch's default
    device: str = "cpu"
    seed: int = 0
    data: str = ""  # a config: the first micro-batches of its training loader instead of random ids
    data_batches: int = 1  # with data: that many micro-batches, each timed step takes the next in turn
    generator_fraction: float = 0.25  # electra models: the generator's width as a share of hidden_size


def _model_cfgs(o: BenchOptions):
    from megamlm.config import ModelConfig, ObjectiveConfig

    mc = ModelConfig(vocab_size=o.vocab_size, hidden_size=o.hidden_size, num_layers=o.num_layers,
                     num_heads=o.num_heads, ffn_size=o.ffn_size, max_position_embeddings=max(512, o.seq_len),
                     dropout=o.dropout, attention_dropout=o.dropout)
    return mc, ObjectiveConfig(pair=o.pair)


def _optimizer(params, device: str):
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    except (RuntimeError, TypeError):  # fused unsupported for this device / torch
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)


def _split_spec(spec: str, o: BenchOptions) -> tuple[str, str]:
    name, _, precision = spec.partition(":")
    precision = precision or o.precision
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r} in {spec!r}: choose fp32 or bf16")
    return name, precision


def _tune_malloc() -> bool:
    from megamlm.engine import tune_cpu_malloc

    return tune_cpu_malloc()


def _megamlm_loss(name: str, precision: str, o: BenchOptions, batches: list):
    """(model, loss_fn(k)) of megamlm on the ops backend its name says (megamlm = engine.kernels=auto)."""
    from megamlm import ops
    from megamlm.model import build_model
    from megamlm.objectives import combine

    mc, oc = _model_cfgs(o)
    model = build_model(mc, oc, o.vocab_size).to(o.device).train()
    kernels = name.partition("-")[2] or "auto"
    ops.use(model, ops.select(kernels, torch.device(o.device).type,
                              torch.bfloat16 if precision == "bf16" else torch.float32)[0])
    fwd = torch.compile(model) if o.compile else model

    def loss_fn(k):
        batch = batches[k]
        return combine(fwd(batch), batch.mlm_positions.numel(), batch.n_examples)
    return model, loss_fn


def _hf_loss(o: BenchOptions, batches: list):
    """(model, loss_fn(k)) of HF BertForPreTraining (SDPA attention) on the padded batches."""
    from transformers import BertConfig, BertForPreTraining

    cfg = BertConfig(vocab_size=o.vocab_size, hidden_size=o.hidden_size, num_hidden_layers=o.num_layers,
                     num_attention_heads=o.num_heads, intermediate_size=o.ffn_size,
                     max_position_embeddings=max(512, o.seq_len), hidden_act="gelu",
                     hidden_dropout_prob=o.dropout, attention_probs_dropout_prob=o.dropout, layer_norm_eps=1e-12)
    cfg._attn_implementation = "sdpa"
    model = BertForPreTraining(cfg).to(o.device).train()
    kws = []
    for batch in batches:
        kws.append(dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                        token_type_ids=batch.token_type_ids, labels=batch.mlm_labels))
        if o.pair != "none":
            kws[-1]["next_sentence_label"] = batch.pair_labels

    def loss_fn(k):
        out = model(**kws[k])
        if out.loss is not None:
            return out.loss
        return torch.nn.functional.cross_entropy(out.prediction_logits.flatten(0, 1).float(),
                                                 batches[k].mlm_labels.view(-1))
    return model, loss_fn


def _build_step(spec: str, o: BenchOptions, batches: list):
    """A closure ``step(k)`` running one training step of model ``spec`` (name[:precision]) on
    ``batches[k % len(batches)]``."""
    name, precision = _split_spec(spec, o)
    packed = name.endswith("+packed")
    if packed:  # the same examples as one packed row (no padding computed)
        from megamlm.data.batch import pack

        if not name.startswith("megamlm"):
            raise ValueError(f"{spec!r}: +packed runs megamlm models only (HF takes padded batches)")
        name = name.removesuffix("+packed")
        batches = [pack(b.to("cpu")).to(o.device) for b in batches]
    torch.manual_seed(o.seed)
    autocast = (torch.autocast(device_type=torch.device(o.device).type, dtype=torch.bfloat16)
                if precision == "bf16" else None)
    if name in ("megamlm", "megamlm-torch", "megamlm-cpu"):  # megamlm-X: on the ops backend X (engine.kernels)
        model, loss_fn = _megamlm_loss(name, precision, o, batches)
    elif name == "hf":
        model, loss_fn = _hf_loss(o, batches)
    elif name in ELECTRA_MODELS:
        model, loss_fn = electra_loss(name, o, batches)
    else:
        raise ValueError(f"unknown model {name!r}; choose megamlm, megamlm-torch, megamlm-cpu, hf, electra or hf-electra")
    opt = _optimizer(model.parameters(), o.device)

    def step(k: int = 0):
        k %= len(batches)
        if packed:  # each training micro-batch builds its segments' index anew: so does every timed step
            batches[k].segments.cache.clear()
        if autocast is not None:
            with autocast:
                loss = loss_fn(k)
        else:
            loss = loss_fn(k)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    n_params = sum(p.numel() for p in model.parameters())
    return step, n_params


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); harmless where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _memory_child(name: str, o: BenchOptions) -> dict:
    """In a fresh process: RSS before building, peak RSS after warmup + a few steps."""
    batches = bench_batches(o)
    if name == "hf":
        import transformers  # noqa: F401  (import cost outside the measurement)
    if o.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if o.threads:
        torch.set_num_threads(o.threads)
    if o.malloc_tuned:
        _tune_malloc()
    _reset_peak_rss()
    before = _proc_status_kb("VmRSS")
    step, _ = _build_step(name, o, batches)
    for k in range(max(2, o.warmup, len(batches)) + 1):
        step(k)
    _sync(o.device)
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec.
    peak = _proc_status_kb("VmHWM")
    out = {"peak_rss_delta_mb": (peak - before) / 1024}
    if o.device.startswith("cuda"):
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _measure_memory(name: str, o: BenchOptions) -> dict:
    if o.device.startswith("cuda"):
        return _memory_child(name, o)
    cmd = [sys.executable, "-c",
           "import json,sys; from megamlm.bench import BenchOptions, _memory_child; "
           "o = BenchOptions(**json.loads(sys.argv[1])); print(json.dumps(_memory_child(sys.argv[2], o)))",
           json.dumps(asdict(o)), name]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if res.returncode:
        raise RuntimeError(f"memory measurement of {name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_bench(o: BenchOptions) -> dict:
    """Time both models interleaved; return the numbers (see :func:`format_report`)."""
    if o.threads:
        torch.set_num_threads(o.threads)
    if o.malloc_tuned and not _tune_malloc():
        log.warning("malloc_tuned: mallopt unavailable (not glibc?); running untuned")
    names = [n.strip() for n in o.models.split(",") if n.strip()]
    for n in names:
        _split_spec(n, o)
    batches = bench_batches(o)
    K = len(batches)
    flops = sum(train_flops(b, o.hidden_size, o.num_layers, o.ffn_size, o.vocab_size, o.pair != "none")
                for b in batches) / K  # per step: the mean over the batches
    flops_of = {n: sum(electra_flops(o, b) for b in batches) / K if _split_spec(n, o)[0] in ELECTRA_MODELS else flops
                for n in names}  # an ELECTRA step: generator and discriminator
    n_tokens = sum(b.n_tokens for b in batches) / K
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    precisions = sorted({_split_spec(n, o)[1] for n in names})
    peaks = {p: [matmul_peak(dtypes[p], device=o.device)] for p in precisions}  # peaks[p][r]: before round r
    steps = {}
    for n in names:
        steps[n], n_params = _build_step(n, o, batches)
        for k in range(max(o.warmup, K if K > 1 else 0)):
            steps[n](k)
        _sync(o.device)
        log.info("built %s (%d parameters)", n, n_params)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(o.rounds):
        if r:
            for p in precisions:
                peaks[p].append(matmul_peak(dtypes[p], device=o.device))
        for n in names:
            _sync(o.device)
            t = time.perf_counter()
            for k in range(o.steps * K):  # every batch o.steps times
                steps[n](k)
            _sync(o.device)
            times[n].append((time.perf_counter() - t) / (o.steps * K))
        log.info("round %d: %s", r, {n: round(times[n][-1], 4) for n in names})
    for p in precisions:  # and after the last round
        peaks[p].append(matmul_peak(dtypes[p], device=o.device))
    peak_of = {p: max(v) for p, v in peaks.items()}
    result = {"options": asdict(o), "n_tokens": n_tokens,
              "n_masked": sum(b.n_targets for b in batches) / K,
              "padding_share": 1.0 - n_tokens * K / sum(b.input_ids.numel() for b in batches),
              "flops_per_step": flops, "matmul_peak_flops": peak_of, "matmul_peaks_per_round": peaks, "models": {}}
    for n in names:
        p = _split_spec(n, o)[1]
        result["models"][n] = _model_numbers(times[n], n_tokens, flops_of[n], peaks[p], peak_of[p])
        sheet = device_datasheet_peak(o.device, p)
        if sheet:  # the vendor's dense peak of this GPU: the denominator Megatron-LM and MosaicBERT use
            result["models"][n]["mfu_datasheet"] = flops_of[n] / result["models"][n]["step_s_median"] / sheet
    result["ratios"] = {}  # the first model's speed over each other's, per round (same round = same machine state)
    for other in names[1:]:
        ratios = sorted(a / b for a, b in zip(times[other], times[names[0]]))
        result["ratios"][other] = {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}
    del steps
    if o.memory:
        for n in names:
            result["models"][n].update(_measure_memory(n, o))
    return result


def _model_numbers(times: list[float], n_tokens: float, flops: float, peaks: list[float], best_peak: float) -> dict:
    """One model's tokens/s (median, min, max over rounds), step time and MFU from its per-round step times;
    each round's MFU against the better of the peaks measured just before and just after it."""
    tps = sorted(n_tokens / t for t in times)
    med_t = statistics.median(times)
    round_mfu = sorted(flops / t / max(peaks[r], peaks[r + 1]) for r, t in enumerate(times))
    return {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": tps[0], "tokens_per_s_max": tps[-1],
            "step_s_median": med_t, "step_s_rounds": times, "mfu": statistics.median(round_mfu),
            "mfu_min": round_mfu[0], "mfu_max": round_mfu[-1], "mfu_vs_best_peak": flops / med_t / best_peak}


def format_report(r: dict) -> str:
    o = r["options"]
    lines = [f"model: H={o['hidden_size']} L={o['num_layers']} heads={o['num_heads']} F={o['ffn_size']} "
             f"V={o['vocab_size']}; batch {o['batch_size']}x{o['seq_len']} ({r['n_tokens']:.0f} real tokens, "
             f"{r['n_masked']:.0f} masked); {o['precision']}{' +compile' if o['compile'] else ''}; "
             f"dropout {o['dropout']}; threads {torch.get_num_threads()}"
             f"{'; malloc tuned' if o.get('malloc_tuned') else ''}{'; padded' if o['padding'] else ''}"
             f"{'; examples of ' + o['data'] if o.get('data') else ''}"
             f"{' (%d batches in turn, per-step means)' % o['data_batches'] if o.get('data_batches', 1) > 1 else ''}"
             f" ({r.get('padding_share', 0.0):.0%} of the padded batch is padding)",
             f"needed FLOPs/step {r['flops_per_step'] / 1e9:.1f} G; matmul peak "
             + ", ".join(f"{p} {min(v) / 1e9:.0f}-{max(v) / 1e9:.0f} GFLOP/s"
                         for p, v in r["matmul_peaks_per_round"].items())
             + f" (MFU against the model's precision, each round against the peak measured next to it); "
               f"{o['rounds']} rounds x {o['steps']} steps"]
    for n, m in r["models"].items():
        mem = ""
        if "peak_rss_delta_mb" in m:
            mem = f"  peak RSS delta {m['peak_rss_delta_mb']:.0f} MB"
        if "cuda_max_allocated_mb" in m:
            mem += f"  cuda max allocated {m['cuda_max_allocated_mb']:.0f} MB"
        lines.append(f"{n:>10}: {m['tokens_per_s_median']:8.0f} tok/s (min {m['tokens_per_s_min']:.0f}, max "
                     f"{m['tokens_per_s_max']:.0f})  step {m['step_s_median'] * 1e3:.0f} ms  MFU "
                     f"{100 * m['mfu']:.1f}% (rounds {100 * m['mfu_min']:.1f}-{100 * m['mfu_max']:.1f}; "
                     f"median step vs best peak {100 * m['mfu_vs_best_peak']:.1f}%)"
                     + (f", {100 * m['mfu_datasheet']:.1f}% of datasheet" if "mfu_datasheet" in m else "") + mem)
    first = next(iter(r["models"]), "")
    for other, q in r.get("ratios", {}).items():
        lines.append(f"   ratio: {first} / {other} = {q['median']:.2f}x (per-round min {q['min']:.2f}, "
                     f"max {q['max']:.2f})")
    return "\n".join(lines)


_HELP = {
    "padding": "right-pad rows to lengths uniform in [seq_len/2, seq_len] (one row full)",
    "pair": "pair head: nsp, sop or none",
    "dropout": "hidden and attention dropout of both models",
    "precision": "fp32 or bf16 (autocast) for every model without its own :precision",
    "compile": "torch.compile the megamlm model",
    "rounds": "interleaved rounds (median, min, max over them)",
    "steps": "timed training steps per round and model",
    "warmup": "untimed steps per model before the rounds",
    "models": "comma list of megamlm | megamlm-torch | megamlm-cpu | hf, each optionally :fp32 or :bf16 (e.g. "
              "megamlm,megamlm-torch,hf:fp32; megamlm-X runs on the ops backend X, plain megamlm on "
              "engine.kernels=auto); a megamlm model with +packed runs the same examples packed into one "
              "row (megamlm+packed,megamlm); electra / hf-electra: megamlm's ELECTRA and HF's ElectraForMaskedLM + "
              "ElectraForPreTraining in a plain loop (their MFU counts both networks); ratios are the first "
              "model's speed over each other's",
    "generator_fraction": "electra models: the generator's width as a share of --hidden-size",
    "data": "a config file: train on the first micro-batch(es) of its training loader (its corpus, tokenizer "
            "and masking, real example lengths; --seq-len, --batch-size, --pair from here) instead of "
            "random ids; sets the vocabulary to the tokenizer's",
    "data_batches": "with --data: the first N micro-batches, each timed step on the next in turn (a round "
                    "runs each --steps times; tokens/s, MFU and the padding share are over all of them)",
    "memory": "peak memory of each model, in a fresh subprocess on CPU",
    "malloc_tuned": "glibc mallopt as `megamlm pretrain` does on CPU (engine.cpu_malloc=tuned), for both "
                    "models: blocks up to 32 MiB from the heap, never trimmed; removes the page faults that "
                    "re-allocated tensors cost every step",
    "threads": "torch.set_num_threads (0 = torch's default)",
}


def add_arguments(parser) -> None:
    """argparse options for :class:`BenchOptions` (shared by the CLI and ``tools/bench_model.py``)."""
    d = BenchOptions()
    for f in d.__dataclass_fields__.values():
        default = getattr(d, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool) and default:
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help=f"skip: {_HELP.get(f.name, f.name)}")
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=_HELP.get(f.name, f"enable {f.name}"))
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"{_HELP.get(f.name, '')} (default {default})".strip())


def bench_model_main(options: BenchOptions, json_path: str | None = None) -> dict:
    """Entry point for ``megamlm bench model`` and ``tools/bench_model.py``: run, print, maybe save."""
    r = run_bench(options)
    print(format_report(r))  # bench output is the CLI's product
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=2)
    return r


def build_arg_parser():
    """``megamlm bench model [options]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="megamlm bench", description="benchmarks")
    sub = ap.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = sub.add_parser("model", help="training-step tokens/s, MFU and peak memory: megamlm vs HF BertForPreTraining",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="log each round")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``megamlm bench model ...`` (argv without the leading ``bench``)."""
    args = vars(build_arg_parser().parse_args(argv))
    args.pop("what")
    json_path = args.pop("json")
    if args.pop("verbose"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bench_model_main(BenchOptions(**args), json_path)
    return 0
