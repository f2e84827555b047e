"""Typed config: loading, overrides, validation messages, shipped configs, light imports.

A failure here points at megamlm/config/ (sections.py: field metadata; load.py: coercion, cross checks) or
megamlm/cli.py (check-config), or at a file in configs/ that no longer validates.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megamlm.config import (
    Config,
    ConfigError,
    config_from_dict,
    describe_fields,
    cross_check,
    dump_config,
    grad_accumulation_steps,
    load_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # pretraining configs
FINETUNE_CONFIGS = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))


def test_every_shipped_config_is_documented_in_the_readme():
    """A config in configs/ that the README never names is one a user cannot find (the README's demo
    names tiny-cpu.yaml; the glob is not empty)."""
    readme = (ROOT / "README.md").read_text()
    shipped = [p.relative_to(ROOT).as_posix() for p in CONFIGS + FINETUNE_CONFIGS]
    assert "configs/tiny-cpu.yaml" in shipped and len(FINETUNE_CONFIGS) >= 3
    assert [p for p in shipped if p not in readme] == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path, world_size=2 * 1)
    assert isinstance(cfg, Config)
    # Round trip through the resolved YAML gives the same config.
    import yaml

    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_finetune_config_validates(path):
    import yaml

    from megamlm.finetune.config import dump_finetune_config, finetune_config_from_dict, load_finetune_config

    cfg = load_finetune_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.task.type == raw["task"]["type"] and cfg.task.reader == raw["task"]["reader"]
    assert cfg.train.output_dir == raw["train"]["output_dir"]  # the file's own values, not the defaults
    assert finetune_config_from_dict(yaml.safe_load(dump_finetune_config(cfg))) == cfg  # resolved YAML round trip


def test_defaults_are_bert_base_and_valid_on_one_rank():
    """No config file: BERT-base (Devlin et al.: 12 layers, 768 wide, 12 heads, FFN 3072, 512 positions,
    15% of the tokens chosen, 80/10/10, NSP) at seq 128, valid on one rank, with nothing to cross-check."""
    cfg = load_config(None, world_size=1)
    m, o = cfg.model, cfg.objective
    assert (m.num_layers, m.hidden_size, m.num_heads, m.ffn_size, m.max_position_embeddings) == (12, 768, 12, 3072, 512)
    assert (o.mlm_probability, o.mask_token_ratio, o.random_token_ratio, o.pair) == (0.15, 0.8, 0.1, "nsp")
    assert cfg.data.seq_len == 128 and cfg.data.packing is False
    assert cross_check(cfg, 1) == []


def test_overrides_win_and_are_typed(tmp_path):
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml",
                      ["data.seq_len=64", "optim.lr=3e-4", "data.inputs=[a.txt, b.txt]", "checkpoint.save_on_signal=false"])
    assert cfg.data.seq_len == 64 and isinstance(cfg.data.seq_len, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.inputs == ["a.txt", "b.txt"]
    assert cfg.checkpoint.save_on_signal is False


def test_single_string_is_accepted_as_a_list():
    assert load_config(None, ["data.inputs=corpus.txt"]).data.inputs == ["corpus.txt"]


def test_unknown_key_names_itself_and_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"seq_lenn": 64}})
    msg = str(e.value)
    assert "data.'seq_lenn'" in msg and "did you mean 'seq_len'" in msg and "micro_batch_size" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown key section 'modle'.*did you mean 'model'"):
        config_from_dict({"modle": {}})


def test_several_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        config_from_dict({
            "model": {"hidden_size": "big", "num_heads": 5},
            "engine": {"zero_stage": 4, "precision": "fp8"},
            "optim": {"lr": -1.0},
            "objective": {"mlm_probability": 1.5},
        })
    p = e.value.problems
    assert len(p) == 5, p
    text = str(e.value)
    assert "model.hidden_size: expected an integer, got 'big'" in text
    assert "engine.zero_stage=4 is not allowed; choose one of 0, 1, 2, 3" in text
    assert "engine.precision='fp8'" in text and "'bf16'" in text
    assert "optim.lr=-1.0 is out of range; it must be > 0.0" in text
    assert "objective.mlm_probability=1.5 is out of range" in text


def test_cross_section_checks():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"hidden_size": 100, "num_heads": 3, "max_position_embeddings": 64},
                          "data": {"seq_len": 128},
                          "objective": {"mask_token_ratio": 0.9, "random_token_ratio": 0.2}})
    text = str(e.value)
    assert "hidden_size=100 is not divisible by model.num_heads=3" in text
    assert "data.seq_len=128 exceeds model.max_position_embeddings=64" in text
    assert "exceeds 1" in text


def test_bools_and_ints_are_not_confused():
    with pytest.raises(ConfigError, match="expected true or false, got 'yes please'"):
        config_from_dict({"checkpoint": {"save_on_signal": "yes please"}})
    with pytest.raises(ConfigError, match="expected an integer, got True"):
        config_from_dict({"data": {"seq_len": True}})
    with pytest.raises(ConfigError, match="expected an integer, got 1.5"):
        config_from_dict({"data": {"seq_len": 1.5}})


def test_world_size_arithmetic():
    raw = {"data": {"micro_batch_size": 8}, "engine": {"global_batch_size": 48}, "parallel": {"vocab_parallel_size": 2}}
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.vocab_parallel_size=2"):
        config_from_dict(raw, world_size=3)
    with pytest.raises(ConfigError, match=r"global_batch_size=48 is not a multiple of .* = 32"):
        config_from_dict(raw, world_size=8)
    cfg = config_from_dict(raw, world_size=4)
    assert grad_accumulation_steps(cfg, 4) == 3


def test_vocab_parallel_must_divide_a_set_vocab_size():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"parallel": {"vocab_parallel_size": 5}, "model": {"vocab_size": 8064}}, world_size=5)
    text = str(e.value)
    assert "parallel.vocab_parallel_size=5 does not divide the padded vocabulary of 8064 rows" in text, text
    assert "set model.vocab_size to a multiple of 640" in text and "e.g. 8320" in text, text
    assert "parallel.vocab_parallel_size to a divisor of 8064 (e.g. 4)" in text, text


def test_without_model_vocab_size_the_padding_multiple_is_not_the_vocabulary():
    """The padded vocabulary is ceil(pieces / pad) * pad: only the tokenizer knows it (preflight.py checks
    it); 8000 pieces padded to a multiple of 1 split over 5 ranks fine."""
    cfg = config_from_dict({"parallel": {"vocab_parallel_size": 5}, "tokenizer": {"pad_vocab_to_multiple": 1}},
                           world_size=5)
    assert cfg.parallel.vocab_parallel_size == 5
    config_from_dict({"parallel": {"vocab_parallel_size": 3}}, world_size=3)  # 128 % 3 says nothing either


def test_a_bad_typed_field_still_reports_every_other_problem():
    """A field that failed its own check keeps its value; the cross checks that read it are skipped (no
    exception, no swallowed problems), the others still run."""
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"hidden_size": "big", "num_heads": 0, "vocab_size": 1000},
                          "parallel": {"vocab_parallel_size": "two"},
                          "data": {"seq_len": 1024, "micro_batch_size": "many"},
                          "optim": {"betas": "steep", "lr": 1e-4, "min_lr": 1e-3},
                          "objective": {"mask_token_ratio": 0.9, "random_token_ratio": 0.2}}, world_size=4)
    p = e.value.problems
    assert p == [
        "data.micro_batch_size: expected an integer, got 'many'",
        "model.hidden_size: expected an integer, got 'big'",
        "model.num_heads=0 is out of range; it must be >= 1",
        "parallel.vocab_parallel_size: expected an integer, got 'two'",
        "optim.betas: expected a list of float, got 'steep'",
        "data.seq_len=1024 exceeds model.max_position_embeddings=512",
        "objective.mask_token_ratio + objective.random_token_ratio = 1.1 exceeds 1",
        "optim.min_lr=0.001 exceeds optim.lr=0.0001",
        "model.vocab_size=1000 is not a multiple of tokenizer.pad_vocab_to_multiple=128",
    ], p


def test_cross_check_never_raises_on_fields_of_the_wrong_type():
    from megamlm.config import ModelConfig, ParallelConfig, TrainConfig, cross_check

    cfg = Config(model=ModelConfig(hidden_size="big", num_heads=0, vocab_size="x"),  # type: ignore[arg-type]
                 parallel=ParallelConfig(vocab_parallel_size=0), train=TrainConfig(max_steps=None))  # type: ignore
    assert cross_check(cfg, world_size=4) == []
    assert cross_check(Config(), world_size="4") == ["world size '4' must be an integer"]  # type: ignore[arg-type]


def test_override_syntax_errors():
    _, problems = parse_overrides(["data.seq_len", "seq_len=3", "a.b.c=1"])
    assert len(problems) == 3
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config(None, ["data.seq_len"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(notmap)
    sec = tmp_path / "sec.yaml"
    sec.write_text("data: 3\n")
    with pytest.raises(ConfigError, match="data: expected a mapping of keys, got 3"):
        load_config(sec)


def test_describe_lists_every_field_with_help():
    text = describe_fields()
    assert "mlm_probability: 0.15" in text and "share of non-special tokens" in text
    assert "zero_stage: 1  # int one of 0|1|2|3" in text
    assert "packing: False  # bool." in text and "micro_batch_tokens: 0  # int >= 0." in text


def test_describe_with_finetune_lists_the_finetuning_keys():
    r = _run_cli("check-config", "--describe", "--finetune")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("init:") and "\ntask:" in r.stdout and "\nhead:" in r.stdout
    assert "pair_mode:" in r.stdout and "freeze_encoder: False" in r.stdout and "packing: False" in r.stdout
    assert "mlm_probability" not in r.stdout  # not the pretraining keys
    plain = _run_cli("check-config", "--describe")
    assert plain.stdout.startswith("tokenizer:") and "mlm_probability" in plain.stdout


def _run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "megamlm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_check_config_cli_prints_resolved_config():
    r = _run_cli("check-config", "configs/tiny-cpu.yaml", "data.seq_len=64", "--world-size", "2")
    assert r.returncode == 0, r.stderr
    assert "seq_len: 64" in r.stdout
    assert "global batch 32 = micro 16 x data-parallel 2 x accumulation 1" in r.stdout


def test_check_config_cli_fails_before_any_work_with_all_problems():
    r = _run_cli("check-config", "configs/tiny-cpu.yaml", "engine.zero_stage=7", "data.seq_lem=3")
    assert r.returncode == 2
    assert "2 problems" in r.stderr and "engine.zero_stage=7" in r.stderr and "seq_lem" in r.stderr
    assert "Traceback" not in r.stderr


def test_import_megamlm_is_light():
    code = ("import sys, megamlm, megamlm.config, megamlm.preflight, megamlm.cli, megamlm.tokenizer, "
            "megamlm.data.shards;"
            "heavy = [m for m in ('deepspeed', 'webdataset', 'tensorboard', 'transformers') if m in sys.modules];"
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"heavy imports at package import: {r.stdout}"


def test_python_dash_m_and_console_script_agree():
    """``python -m megamlm`` and the installed ``megamlm`` script are one program: the same help."""
    r = _run_cli("--help")
    assert r.returncode == 0 and "check-config" in r.stdout and "make-shards" in r.stdout
    script = Path(sys.executable).parent / "megamlm"
    assert script.is_file(), f"{script}: the console script is not installed (pip install -e .)"
    s = subprocess.run([str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0 and s.stdout == r.stdout, (s.stdout[:300], r.stdout[:300])


def test_readme_cluster_examples_fit_their_allocations():
    """Every sbatch / chain.sh line of README's cluster section names a config and overrides that validate
    for the world size of its allocation (--nodes x the script's 8 tasks per node)."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 10)].replace("\\\n", " ")
    lines = [ln.strip() for ln in section.splitlines() if re.match(r"\s*(\w+=\S+ )*(sbatch|slurm/chain\.sh) ", ln)]
    assert len(lines) >= 4, lines
    for line in lines:
        words = [w for w in shlex.split(line) if not re.match(r"^[A-Z_]+=", w)]
        nodes = next((int(w.split("=")[1]) for w in words if w.startswith("--nodes=")), 1)
        rest = words[words.index("slurm/pretrain.sbatch") + 1:] if "slurm/pretrain.sbatch" in words \
            else words[words.index("--") + 1:]
        cfg = load_config(ROOT / rest[0], rest[1:], world_size=nodes * 8)
        assert cfg is not None, line
