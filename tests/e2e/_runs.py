"""Helpers for tests that launch real training processes: launchers, weights from checkpoints,
TensorBoard scalars read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def clean_env(threads: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo",
               PYTHONUNBUFFERED="1")
    return env


def launch(cmd: list[str], timeout: float = 300, threads: int = 1) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, env=clean_env(threads), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n"
                             f"--- stderr\n{r.stderr[-8000:]}")
    return r


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), script, *args]


def free_port() -> int:
    from tests._spawn import free_port as fp

    return fp()


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def final_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the newest checkpoint, consolidated from any ZeRO stage."""
    return final_weights_at(ckpt_dir, (ckpt_dir / "latest").read_text().strip())


def final_weights_at(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint ``tag``, consolidated from any ZeRO stage."""
    states = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    optim = list((ckpt_dir / tag).glob("*optim_states.pt"))
    if optim:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        return {k: v.detach() for k, v in sd.items()}
    return dict(torch.load(states, map_location="cpu", weights_only=False)["module"])


def tb_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """Scalars of ``tag`` by step, read back from the event files (megamlm.telemetry.read_scalars)."""
    from megamlm.telemetry import read_scalars

    return read_scalars(log_dir, tag)

def tiny_tokenizer(directory: Path):
    """A small BPE SentencePiece model trained on generated sentences (well under a second)."""
    from megamlm.tokenizer import train_tokenizer
    from tests.unit.test_tokenizer import fake_sentences

    return train_tokenizer(fake_sentences(2000), Path(directory) / "spm.model", vocab_size=600, model_type="bpe")


# The corpus, tokenizer and model every launcher-level e2e test shares: the real default corpus, a 1000-piece
# BPE tokenizer (padded to 1024), a 2-layer H=64 encoder, NSP. Each test adds its own engine/train/checkpoint.
TINY_CFG = """
tokenizer: {model: %(dir)s/tok/spm.model, vocab_size: 1000, model_type: bpe, input_sentence_size: 20000}
data: {source: wiki-vital, shards_dir: %(dir)s/shards, shard_size_mb: 0.25, val_fraction: 0.02, seq_len: 64,
       micro_batch_size: %(micro)d, num_workers: 1, shuffle_buffer: 200}
model: {hidden_size: 64, num_layers: 2, num_heads: 2, ffn_size: 128, max_position_embeddings: 64%(model_extra)s}
objective: {pair: nsp}
optim: {lr: 2.0e-3, warmup_steps: %(warmup)d}
"""


def tiny_prepared_config(directory: Path, rest: str, *, micro: int = 8, warmup: int = 2,
                         model_extra: str = "") -> Path:
    """Write ``directory/cfg.yaml`` (:data:`TINY_CFG` + the test's own sections ``rest``) and make its
    tokenizer and shards with `megamlm prepare`; returns the config path."""
    p = Path(directory) / "cfg.yaml"
    p.write_text(TINY_CFG % {"dir": directory, "micro": micro, "warmup": warmup, "model_extra": model_extra}
                 + rest.lstrip("\n"))
    launch([sys.executable, "-m", "megamlm", "prepare", str(p), "--no-progress"])
    return p
