"""Typed configuration: one dataclass per section, loaded from YAML plus ``section.key=value`` overrides.

Every field carries its help text and its allowed values in ``field(metadata=...)``; that metadata is
the single source for validation, for ``megamlm check-config`` and for the docs. Problems are
collected and raised together as one :class:`ConfigError` (a ``ValueError``), each naming the key, the
value and what is allowed. Builders take their own section where they can (the model, the loader, the
tokenizer); the engine and the trainer take the whole :class:`Config`, whose sections they combine.

The checks against the files a config names (tokenizer, shards) live in :mod:`megamlm.preflight`, imported
by those who need them (check-config, pretrain's preflight), not here: it reads the tokenizer and the manifest.
"""

from megamlm.config.load import (
    config_from_dict,
    config_to_dict,
    cross_check,
    data_parallel_size,
    describe_fields,
    dump_config,
    grad_accumulation_steps,
    load_config,
    parse_overrides,
    validate_dict,
    valid_fields,
)
from megamlm.config.sections import (
    SECTIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EngineConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    TelemetryConfig,
    TokenizerConfig,
    TrainConfig,
    opt,
)

__all__ = [
    "Config", "ConfigError", "SECTIONS", "opt",
    "TokenizerConfig", "DataConfig", "ModelConfig", "ObjectiveConfig", "ParallelConfig", "OptimConfig",
    "EngineConfig", "TrainConfig", "CheckpointConfig", "TelemetryConfig",
    "load_config", "parse_overrides", "config_to_dict", "config_from_dict", "cross_check", "dump_config",
    "describe_fields", "data_parallel_size", "grad_accumulation_steps", "validate_dict", "valid_fields",
]
