"""Elastic resume of pretraining (issue 21): a checkpoint of 2 data-parallel ranks resumed on 1 and on 3,
at ZeRO 1, 2 and 3. DeepSpeed's universal checkpoint carries the ZeRO state over: after the resume every
parameter's fp32 weight and both Adam moments equal those of the same checkpoint resumed on its own 2 ranks,
exactly; the step and the learning rate go on. A failure points at megamlm/checkpoint.py (to_universal,
load), megamlm/pretrain.py (layout_changed, the conversion on rank 0) or DeepSpeed's universal loading.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e._runs import BIN, ROOT, free_port, launch, tiny_prepared_config

REST = """
train: {max_steps: 3, log_every: 1, eval_every: 0}
checkpoint: {every_steps: 3, keep_last: 5}
engine: {global_batch_size: 48}
"""


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    return tiny_prepared_config(tmp_path_factory.mktemp("elastic"), REST)


def _cmd(ranks: int, script: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, *script]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *script]


def _dump(ranks: int, cfg_file: Path, run: Path, stage: int, out: Path) -> dict:
    launch(_cmd(ranks, [str(ROOT / "tests/e2e/run_layout_dump.py"), str(out), str(cfg_file),
                        f"train.output_dir={run}", f"engine.zero_stage={stage}"]), threads=1)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_checkpoint_of_two_ranks_resumes_on_one_and_three_with_the_same_weights_and_moments(cfg_file, tmp_path,
                                                                                              stage):
    src = tmp_path / "run"
    launch(_cmd(2, ["-m", "megamlm", "pretrain", str(cfg_file), f"train.output_dir={src}",
                    f"engine.zero_stage={stage}"]))
    same = _dump(2, cfg_file, src, stage, tmp_path / "same.pt")
    assert same["dp"] == 2 and same["step"] == 3 and not (src / "checkpoints" / "universal").exists()
    for ranks in (1, 3):
        run = tmp_path / f"on{ranks}"
        shutil.copytree(src, run)
        got = _dump(ranks, cfg_file, run, stage, tmp_path / f"on{ranks}.pt")
        assert got["dp"] == ranks and got["step"] == 3 and got["lr"] == same["lr"] and got["epoch"] == same["epoch"]
        assert (run / "checkpoints" / "universal" / "step00000003" / "COMPLETE").is_file()
        assert set(got["params"]) == set(same["params"])
        for name, (w, m, v) in same["params"].items():
            gw, gm, gv = got["params"][name]
            assert torch.equal(gw, w) and torch.equal(gm, m) and torch.equal(gv, v), (ranks, name)
        assert float(same["params"][name][2].abs().sum()) > 0  # the moments are real, not fresh zeros
