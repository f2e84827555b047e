"""Entry for the elastic-resume tests: `python run_layout_dump.py OUT CONFIG [overrides...]` under any launcher.

Builds the pretraining run exactly as `megamlm pretrain --resume auto` does (megamlm.pretrain.build_run: on
another data-parallel size, through DeepSpeed's universal checkpoint), trains nothing, and writes to OUT
(torch.save, rank 0) every parameter's full fp32 weight and Adam moments as the engine now holds them
(deepspeed.utils.safe_get_full_*: any ZeRO stage, collective), with the step, the learning rate and the
loader's epoch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megamlm.checkpoint import resolve_resume  # noqa: E402
from megamlm.config import load_config  # noqa: E402
from megamlm.distributed.env import from_environ  # noqa: E402
from megamlm.engine import current_lr, init_distributed, resolve_backend, shutdown  # noqa: E402
from megamlm.pretrain import _before_process_group, build_run  # noqa: E402
from megamlm.telemetry import setup_logging  # noqa: E402


def main(out: str, config: str, *overrides: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    setup_logging()
    cfg = load_config(config, list(overrides))
    de = from_environ()
    tag = resolve_resume("auto", cfg.checkpoint_dir)
    _before_process_group(cfg)
    init_distributed(de, resolve_backend(cfg.engine))
    run = build_run(cfg, de, tag, None, None)
    engine = run.trainer.engine
    # ZeRO 1-2 link each parameter to its optimizer-state fragment at the first step; no step is taken here
    getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
    dump = {"step": run.trainer.state.step, "lr": current_lr(engine), "epoch": run.trainer.loader.epoch,
            "dp": run.trainer.topo.dp_size, "params": {}}
    for name, p in engine.module.named_parameters():
        full = [safe_get_full_fp32_param(p)] + [safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")]
        dump["params"][name] = [t.detach().cpu().clone() for t in full]
    if de.rank == 0:
        torch.save(dump, out)
    shutdown(engine, de.world_size)  # as pretrain ends: no rank exits while another still talks to it


if __name__ == "__main__":
    main(*sys.argv[1:])
