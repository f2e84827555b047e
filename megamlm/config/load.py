"""Loading and validating configs: YAML + ``section.key=value`` overrides → a checked :class:`Config`.

Problems are collected and raised together as one :class:`ConfigError`, each naming the key, the value
and what is allowed; cross-section checks (batch arithmetic with the world size among them) run too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from megamlm.config.sections import SECTIONS, Config, ConfigError

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


def unknown_key(key: str, valid: list[str], where: str) -> str:
    """The problem line for an unknown ``key`` (``where`` prefixes it: "data." or "section "), with the
    closest valid key and the list of valid ones (shared by the pretraining and fine-tuning configs)."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {where}{key!r}{hint}; valid keys: {', '.join(valid)}"


def section_from_dict(cls: type, name: str, raw: Any, problems: list[str]) -> Any:
    """Section dataclass ``cls`` named ``name`` from its raw mapping: unknown keys and values that break a
    field's type or constraints go to ``problems`` (the defaults stand in), never an exception."""
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
            problems.append(unknown_key(str(key), list(fields), f"{name}."))
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


def validate_dict(raw: dict, world_size: int | None = None) -> tuple[Config, list[str]]:
    """A :class:`Config` from ``raw`` and every problem found, without raising: fields that failed their
    checks keep the value given, and the cross-section checks skip the ones whose inputs failed."""
    problems: list[str] = []
    for key in raw:
        if key not in SECTIONS:
            problems.append(unknown_key(str(key), list(SECTIONS), "section "))
    sections = {name: section_from_dict(cls, name, raw.get(name), problems) for name, cls in SECTIONS.items()}
    cfg = Config(**sections)
    _objective_defaults(cfg.objective, raw.get("objective"))
    problems.extend(cross_check(cfg, world_size))
    return cfg, problems


#: The defaults that differ for objective.name=electra (ELECTRA's masking: 85% [MASK], 15% kept; no pair task).
ELECTRA_DEFAULTS = {"mask_token_ratio": 0.85, "random_token_ratio": 0.0, "pair": "none"}


def _objective_defaults(objective, raw) -> None:
    """The objective's own defaults for the keys the config leaves out (:data:`ELECTRA_DEFAULTS`)."""
    if objective.name != "electra":
        return
    given = raw if isinstance(raw, dict) else {}
    for key, value in ELECTRA_DEFAULTS.items():
        if key not in given:
            setattr(objective, key, value)


def config_from_dict(raw: dict, source: str | None = None, world_size: int | None = None) -> Config:
    """Build and validate a :class:`Config`; every problem found is raised together."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections, got {type(raw).__name__}"], source)
    cfg, problems = validate_dict(raw, world_size)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def valid_fields(cfg: Config) -> set[str]:
    """``section.key`` of every field whose value passes its own type and range checks (a field that
    failed keeps the value it was given, so checks on several fields first ask this)."""
    ok = set()
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        if not isinstance(section, cls):
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            scratch: list[str] = []
            value = _coerce(getattr(section, f.name), hints[f.name], "", scratch)
            if not scratch:
                _check_range(value, f.metadata, "", scratch)
            if not scratch:
                ok.add(f"{name}.{f.name}")
    return ok


def vocab_parallel_hint(rows: int, vp: int, pad: int) -> str:
    """The keys that make ``vp`` divide a vocabulary of ``rows`` rows (``pad``: tokenizer.pad_vocab_to_multiple)."""
    step = math.lcm(vp, pad)
    divisors = [d for d in range(vp - 1, 0, -1) if rows % d == 0]
    return (f"set model.vocab_size to a multiple of {step} (a multiple of both parallel.vocab_parallel_size={vp} "
            f"and tokenizer.pad_vocab_to_multiple={pad}), e.g. {-(-rows // step) * step}, or "
            f"parallel.vocab_parallel_size to a divisor of {rows} (e.g. {divisors[0]})")


def cross_check(cfg: Config, world_size: int | None = None) -> list[str]:
    """Checks that involve more than one field; ``world_size`` adds the batch and topology arithmetic.

    A check runs only when its fields passed their own checks (those already reported the problem), so a
    field of the wrong type or out of range never raises here. The padded vocabulary of a config without
    model.vocab_size is the tokenizer's: :func:`megamlm.preflight.check_files` checks it against the file."""
    ok = valid_fields(cfg)

    def need(*keys: str) -> bool:
        return all(k in ok for k in keys)

    p: list[str] = []
    m, o, d = cfg.model, cfg.objective, cfg.data
    if need("model.hidden_size", "model.num_heads") and m.hidden_size % m.num_heads:
        p.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if need("data.seq_len", "model.max_position_embeddings") and d.seq_len > m.max_position_embeddings:
        p.append(f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    p += _packing_checks(d, need)
    if need("objective.mask_token_ratio", "objective.random_token_ratio") \
            and o.mask_token_ratio + o.random_token_ratio > 1.0 + 1e-9:
        p.append(f"objective.mask_token_ratio + objective.random_token_ratio = "
                 f"{o.mask_token_ratio + o.random_token_ratio:g} exceeds 1")
    if need("objective.pair", "model.type_vocab_size") and o.pair != "none" and m.type_vocab_size < 2:
        p.append(f"objective.pair={o.pair!r} needs model.type_vocab_size >= 2, got {m.type_vocab_size}")
    p += _electra_checks(cfg, need)
    if need("optim.betas") and (len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas)):
        p.append(f"optim.betas={cfg.optim.betas!r} must be two numbers in [0, 1)")
    if need("optim.lr", "optim.min_lr") and cfg.optim.lr > 0 and cfg.optim.min_lr > cfg.optim.lr:
        p.append(f"optim.min_lr={cfg.optim.min_lr} exceeds optim.lr={cfg.optim.lr}")
    steps = cfg.train.profile_steps
    if need("train.profile_steps") and not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps):
        p.append(f"train.profile_steps={steps!r} must be a list of step numbers >= 1")
    if need("train.max_steps", "train.max_tokens") and cfg.train.max_steps == 0 and cfg.train.max_tokens == 0:
        p.append("train.max_steps and train.max_tokens are both 0: set a budget")
    p += _vocab_checks(cfg, ok)
    if world_size is not None:
        p += _world_checks(cfg, world_size, ok)
    return p


def _electra_checks(cfg: Config, need) -> list[str]:
    """objective.name=electra against the pair task and the generator's shape."""
    o, m = cfg.objective, cfg.model
    if not (need("objective.name") and o.name == "electra"):
        return []
    p = []
    if need("objective.pair") and o.pair != "none":
        p.append(f"objective.pair={o.pair!r} with objective.name='electra': ELECTRA has no sentence-pair task (its "
                 f"discriminator learns from every token); set objective.pair: none (electra's default), or "
                 f"objective.name: mlm for {o.pair.upper()}")
    keys = ("model.hidden_size", "model.num_layers", "objective.generator_hidden_fraction",
            "objective.generator_layers", "objective.generator_heads", "objective.generator_ffn_size")
    if need(*keys):
        width, _, heads, _ = o.generator_shape(m.hidden_size, m.num_layers)
        if width % heads:
            p.append(f"the ELECTRA generator's width {width} (model.hidden_size={m.hidden_size} x "
                     f"objective.generator_hidden_fraction={o.generator_hidden_fraction:g}) is not divisible by "
                     f"objective.generator_heads={heads}")
    return p


def _packing_checks(d, need) -> list[str]:
    """data.packing against the padding and the token budget."""
    if not need("data.packing", "data.micro_batch_tokens"):
        return []
    if not d.packing:
        if d.micro_batch_tokens:
            return [f"data.micro_batch_tokens={d.micro_batch_tokens} applies to packed micro-batches only: "
                    f"set data.packing=true, or leave data.micro_batch_tokens at 0"]
        return []
    p = []
    if need("data.pad_to") and d.pad_to == "max":
        p.append("data.pad_to=max pads every row to data.seq_len, and data.packing=true has no padding: "
                 "use data.pad_to=longest (the default) with packing")
    if need("data.seq_len") and d.micro_batch_tokens and d.micro_batch_tokens < d.seq_len:
        p.append(f"data.micro_batch_tokens={d.micro_batch_tokens} is smaller than data.seq_len={d.seq_len}: a "
                 f"packed micro-batch must hold the longest example")
    return p


def _vocab_checks(cfg: Config, ok: set[str]) -> list[str]:
    """model.vocab_size (when set) against the padding multiple and the vocab-parallel size."""
    if "model.vocab_size" not in ok or not cfg.model.vocab_size:
        return []
    rows, pad, vp = cfg.model.vocab_size, cfg.tokenizer.pad_vocab_to_multiple, cfg.parallel.vocab_parallel_size
    pad_ok, vp_ok = "tokenizer.pad_vocab_to_multiple" in ok, "parallel.vocab_parallel_size" in ok
    p = []
    if pad_ok and rows % pad:
        p.append(f"model.vocab_size={rows} is not a multiple of tokenizer.pad_vocab_to_multiple={pad}")
    if pad_ok and vp_ok and rows % vp:
        p.append(f"parallel.vocab_parallel_size={vp} does not divide the padded vocabulary of {rows} rows "
                 f"(model.vocab_size={rows}): {vocab_parallel_hint(rows, vp, pad)}")
    return p


def _world_checks(cfg: Config, world_size: int, ok: set[str]) -> list[str]:
    if not isinstance(world_size, int) or isinstance(world_size, bool):
        return [f"world size {world_size!r} must be an integer"]
    if world_size < 1:
        return [f"world size {world_size} must be >= 1"]
    if "parallel.vocab_parallel_size" not in ok:
        return []
    vp = cfg.parallel.vocab_parallel_size
    if world_size % vp:
        return [f"world size {world_size} is not divisible by parallel.vocab_parallel_size={vp}"]
    if not {"data.micro_batch_size", "engine.global_batch_size"} <= ok:
        return []
    d, e = cfg.data, cfg.engine
    dp = world_size // vp
    per_step = d.micro_batch_size * dp
    if e.global_batch_size and e.global_batch_size % per_step:
        return [f"engine.global_batch_size={e.global_batch_size} is not a multiple of "
                f"data.micro_batch_size={d.micro_batch_size} x data-parallel size {dp} = {per_step}"]
    return []


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
        names = key.strip().split(".")
        if len(names) != 2 or not all(names):
            problems.append(f"override {item!r}: the key must be section.key, e.g. data.seq_len=128")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})")
            continue
        out.setdefault(names[0], {})[names[1]] = value
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
    source = str(path) if path else "<defaults>"
    return config_from_dict(read_with_overrides(path, overrides), source, world_size)


def read_with_overrides(path: str | Path | None, overrides: list[str] | None) -> dict:
    """A YAML file's mapping (``{}`` for None) with ``section.key=value`` overrides merged in; a missing
    file, bad YAML, non-UTF-8 bytes, a bad override or a non-mapping top level raise ConfigError."""
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
    return _merge(raw, over)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def describe_fields(sections: dict[str, type] | None = None) -> str:
    """Every section and key with its type, default, constraint and help (``check-config --describe``):
    of the pretraining config, or of ``sections`` (the fine-tuning config's ``FT_SECTIONS``)."""
    lines = []
    for name, cls in (SECTIONS if sections is None else sections).items():
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
