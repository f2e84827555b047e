"""Memory and time of the vocabulary-sized part of the model — embedding / tied decoder, its bias, the
logits and their gradient — for vocab-parallel sizes vp, per rank.

* :func:`vocab_memory`: bytes per rank from tensor sizes (fp32 training): parameters, gradients, AdamW
  moments (unpartitioned; ZeRO 1–2 divide them by the data-parallel size) and the [N, V/vp] logits — the
  cross-entropy reads them in row chunks and writes their gradient in place, so they are allocated once.
* :func:`measure`: vp gloo processes on this machine (1 thread each) run the decoder + cross-entropy
  forward and backward on N masked rows (exactly what :class:`~megamlm.parallel.layers.VocabParallelDecoder`
  and :func:`~megamlm.parallel.vocab.vocab_parallel_cross_entropy` do in training; vp = 1 uses the model's
  own :class:`~megamlm.model.heads.TiedDecoder`): the step time (median over repeats, slowest rank) and
  the peak resident-memory growth of a rank during the step (logits, gradients, temporaries).

``tools/bench_vocab_parallel.py`` is the command-line front end. vp processes on fewer cores than vp are
contended: state it with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

__all__ = ["vocab_memory", "measure", "main"]

MiB = 1 << 20


def vocab_memory(vocab: int, hidden: int, rows: int, vp: int, real_vocab: int | None = None) -> dict[str, int]:
    """Bytes per rank (fp32) of the vocabulary-sized tensors for vocab-parallel size ``vp``.

    ``vocab``: padded rows (divisible by vp); ``real_vocab``: the vp = 1 decoder projects onto these only;
    ``rows``: masked rows N. The per-rank constant (the decoder input and its gradient, [N, H] each, and a
    few [N] vectors) does not shrink with vp."""
    real = vocab if real_vocab is None else real_vocab
    rows_per_rank = vocab // vp
    cols = real if vp == 1 else rows_per_rank  # vp > 1: the padded columns are computed and masked to -inf
    f = 4
    out = {"embedding_weight": rows_per_rank * hidden * f, "embedding_grad": rows_per_rank * hidden * f,
           "bias_and_grad": 2 * rows_per_rank * f,
           "adam_moments": 2 * (rows_per_rank * hidden + rows_per_rank) * f,
           "logits": rows * cols * f, "constant": (2 * rows * hidden + 6 * rows) * f}
    out["total"] = sum(out.values())
    return out


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank(rank: int, world: int, port: int, args: dict, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        queue.put((rank, _run(rank, world, args)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        queue.put((rank, {"error": repr(e)}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(rank: int, world: int, a: dict) -> dict:
    import torch
    import torch.distributed as dist

    from megamlm.model.heads import TiedDecoder
    from megamlm.parallel.layers import VocabParallelDecoder, mark_vocab_parallel, vocab_range
    from megamlm.parallel.vocab import vocab_parallel_cross_entropy

    group = None
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.new_group(list(range(world)))
    V, real, H, N = a["vocab"], a["real_vocab"], a["hidden"], a["rows"]
    start, end = vocab_range(V, group)
    g = torch.Generator().manual_seed(1000 + rank)
    weight = torch.nn.Parameter(0.02 * torch.randn(end - start, H, generator=g))  # this rank's rows only
    if world > 1:
        dec = VocabParallelDecoder(mark_vocab_parallel(weight), torch.zeros(end - start), real, start, group)
    else:
        dec = TiedDecoder(weight, real)
    g = torch.Generator().manual_seed(7)  # the same rows and labels on every rank
    h = torch.randn(N, H, generator=g).requires_grad_(True)
    labels = torch.randint(0, real, (N,), generator=g)

    def step() -> float:
        if group is not None:
            dist.barrier(group=group)
        t0 = time.perf_counter()
        logits = dec(h)  # [N, V/vp]
        loss = vocab_parallel_cross_entropy(logits, labels, group, inplace_backward=True).sum()
        del logits
        loss.backward()
        return time.perf_counter() - t0

    base = _rss()
    first = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = [step() for _ in range(a["repeats"])]
    return {"first_s": first, "median_s": statistics.median(times) if times else first,
            "peak_step_bytes": max(peak, 0)}


def measure(vocab: int, hidden: int, rows: int, vp: int, real_vocab: int | None = None, repeats: int = 2) -> dict:
    """Run vp processes (spawned here) and return the slowest rank's median step time and the largest
    per-rank peak memory growth during a step."""
    import socket

    import torch.multiprocessing as mp

    args = {"vocab": vocab, "real_vocab": real_vocab or vocab, "hidden": hidden, "rows": rows, "repeats": repeats}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, vp, port, args, queue)) for r in range(vp)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in range(vp))
    for p in procs:
        p.join()
    errors = [r.get("error") for r in results.values() if "error" in r]
    if errors:
        raise RuntimeError(f"vocab-parallel bench vp={vp} failed: {errors}")
    return {"vp": vp, "median_s": max(r["median_s"] for r in results.values()),
            "first_s": max(r["first_s"] for r in results.values()),
            "peak_step_bytes": max(r["peak_step_bytes"] for r in results.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=256_000, help="padded vocabulary V (divisible by every vp)")
    p.add_argument("--real-vocab", type=int, default=0, help="real pieces (0 = V)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rows", type=int, default=4096, help="masked rows N per micro-batch")
    p.add_argument("--sizes", default="1,2,4", help="vocab-parallel sizes vp to run")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the first")
    p.add_argument("--analytic-only", action="store_true", help="print the tensor-size table, run nothing")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    real = a.real_vocab or a.vocab
    print(f"V={a.vocab} (real {real}), H={a.hidden}, N={a.rows}; {os.cpu_count()} CPU(s), 1 thread per rank")
    rows = []
    for vp in sizes:
        m = vocab_memory(a.vocab, a.hidden, a.rows, vp, real)
        row = {"vp": vp, "analytic": m}
        if not a.analytic_only:
            row.update(measure(a.vocab, a.hidden, a.rows, vp, real, a.repeats))
        rows.append(row)
        line = (f"vp={vp}: per rank {m['total'] / MiB:8.1f} MiB = weight {m['embedding_weight'] / MiB:.1f} + grad "
                f"{m['embedding_grad'] / MiB:.1f} + adam {m['adam_moments'] / MiB:.1f} + bias {m['bias_and_grad'] / MiB:.1f}"
                f" + logits {m['logits'] / MiB:.1f} + const {m['constant'] / MiB:.1f}")
        if "median_s" in row:
            line += (f" | measured step peak +{row['peak_step_bytes'] / MiB:.1f} MiB, decoder+CE fwd+bwd "
                     f"{row['median_s'] * 1e3:.0f} ms (first {row['first_s'] * 1e3:.0f} ms)")
        print(line, flush=True)
    base = next((r for r in rows if r["vp"] == 1 and "median_s" in r), None)
    if base:
        for r in rows:
            if r["vp"] != 1 and "median_s" in r:
                print(f"vp={r['vp']} vs vp=1: step time x{r['median_s'] / base['median_s']:.2f}, memory (analytic) "
                      f"x{r['analytic']['total'] / base['analytic']['total']:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0
