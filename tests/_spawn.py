"""Spawn N gloo ranks on this machine and re-raise the first rank's error in the test process.

    results = spawn(fn, world_size=2, args=(x,))   # fn(rank, world_size, *args) -> picklable value

Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment and an
initialised gloo process group; the return values come back in rank order.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from queue import Empty

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue, init_pg):
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        queue.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - everything goes back to the test process
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if init_pg and dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, args: tuple = (), timeout: float = 300.0, init_process_group: bool = True):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, init_process_group))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, ok, out = queue.get(timeout=1.0)
        except Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in results]
            if dead:
                errors.append(f"rank(s) died without a report: {dead}")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout}s waiting for ranks")
            continue
        if ok:
            results[rank] = out
        else:
            errors.append(f"rank {rank} failed:\n{out}")
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.terminate()
    if errors:
        raise RuntimeError("\n".join(errors))
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (0, None)]
    if bad:
        raise RuntimeError(f"ranks exited with codes {bad}")
    return [results[r] for r in range(world_size)]
