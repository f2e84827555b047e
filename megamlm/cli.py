"""``megamlm <verb>``: argv → Config → one entry function; the argument parsing and the one-line printing of
a :class:`~megamlm.errors.MegamlmError` live here, the work in the entry functions.

Every verb that reads a config takes ``CONFIG [section.key=value ...]``; the overrides win over the file.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megamlm.config import ConfigError, describe_fields, dump_config, load_config

log = logging.getLogger("megamlm")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of config values")


def _load(args, world_size: int | None = None, extra: list[str] | None = None):
    cfg = load_config(args.config, list(args.overrides) + (extra or []), world_size=world_size)
    from megamlm.telemetry import setup_logging

    setup_logging(cfg.telemetry.log_level)
    return cfg


def cmd_check_config(args) -> int:
    """Validate a pretraining or a fine-tuning config (one with an ``init``, ``task`` or ``head`` section, or
    ``--finetune``) with the files it names and the engine on this machine (megamlm.preflight), print it
    resolved, and say on stderr what could not be checked."""
    if args.describe:  # the fine-tuning config's keys with --finetune
        from megamlm.finetune.config import FT_SECTIONS

        print(describe_fields(FT_SECTIONS if args.finetune else None))
        return 0
    if not args.config:
        raise ConfigError(["check-config needs a CONFIG file (or --describe)"])
    from megamlm.config.load import read_with_overrides
    from megamlm.finetune.config import is_finetune_dict

    raw = read_with_overrides(args.config, args.overrides)
    if args.finetune or is_finetune_dict(raw):
        return _check_finetune_config(args, raw)
    from megamlm.preflight import check_files, engine_problems
    from megamlm.config.load import validate_dict

    cfg, problems = validate_dict(raw, args.world_size)
    files = check_files(cfg)
    problems += engine_problems(cfg) + files.problems
    if problems:
        raise ConfigError(problems, args.config)
    print(dump_config(cfg), end="")
    if args.world_size:
        from megamlm.config import data_parallel_size, grad_accumulation_steps

        dp = data_parallel_size(cfg, args.world_size)
        ga = grad_accumulation_steps(cfg, args.world_size)
        print(f"# world size {args.world_size}: data-parallel {dp} x vocab-parallel "
              f"{cfg.parallel.vocab_parallel_size}; global batch {cfg.data.micro_batch_size * dp * ga} = "
              f"micro {cfg.data.micro_batch_size} x data-parallel {dp} x accumulation {ga}")
        if cfg.data.packing:
            from megamlm.data.stream import packed_token_budget

            budget = packed_token_budget(cfg.data)
            print(f"# packed: each micro-batch holds up to {budget} tokens of whole examples, "
                  f"{budget * dp * ga} tokens a step")
    unchecked = files.unchecked + ([] if args.world_size else
                                   ["the batch and topology arithmetic (pass --world-size N)"])
    _say_unchecked(unchecked, "its tokenizer and shards too")
    return 0


def _check_finetune_config(args, raw) -> int:
    from megamlm.finetune.config import dump_finetune_config, validate_finetune_dict
    from megamlm.preflight import check_finetune

    if raw is not None and not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections, got {type(raw).__name__}"], args.config)
    cfg, problems = validate_finetune_dict(raw or {})
    checks = check_finetune(cfg, args.world_size)
    problems += checks.problems
    if problems:
        raise ConfigError(problems, args.config)
    print(dump_finetune_config(cfg), end="")
    if args.world_size:
        w, bs = args.world_size, cfg.train.batch_size
        print(f"# world size {w}: data-parallel {w}; step {bs} sequences = micro {bs // w} x data-parallel {w}")
    _say_unchecked(checks.unchecked, "its init checkpoint, tokenizer and task data too")
    return 0


def _say_unchecked(unchecked: list[str], all_checked: str) -> None:
    for line in unchecked:
        print(f"# not checked: {line}", file=sys.stderr)
    if unchecked:
        print(f"# configuration is valid as far as checked ({len(unchecked)} check(s) not run, above)",
              file=sys.stderr)
    else:
        print(f"# configuration is valid, {all_checked}", file=sys.stderr)


def _source_overrides(args) -> list[str]:
    extra = []
    if getattr(args, "input", None):
        extra.append("data.inputs=[" + ",".join(repr(str(p)) for p in args.input) + "]")
    if getattr(args, "source", None):
        extra.append(f"data.source={args.source}")
    return extra


def cmd_train_tokenizer(args) -> int:
    extra = _source_overrides(args)
    if args.output:
        extra.append(f"tokenizer.model={args.output}")
    cfg = _load(args, extra=extra)
    from megamlm.prepare import train_tokenizer_from_config

    tok = train_tokenizer_from_config(cfg, overwrite=args.overwrite)
    print(f"tokenizer: {tok.path} ({tok.vocab_size} pieces, model vocabulary padded to {tok.padded_vocab_size})")
    return 0


def cmd_make_shards(args) -> int:
    extra = _source_overrides(args)
    if args.output:
        extra.append(f"data.shards_dir={args.output}")
    cfg = _load(args, extra=extra)
    from megamlm.data.shards import make_shards

    man = make_shards(cfg.data, cfg.tokenizer.model, overwrite=args.overwrite, workers=args.workers,
                      progress=not args.no_progress)
    tr, va = man["splits"]["train"]["totals"], man["splits"]["val"]["totals"]
    mb = man["read"]["text_bytes"] / 1e6
    print(f"shards: {cfg.data.shards_dir}: train {tr['documents']} documents / {tr['tokens']} tokens, "
          f"val {va['documents']} documents / {va['tokens']} tokens; skipped "
          f"{sum(man['skipped'].values())}; {mb / man['seconds']:.2f} MB/s with {man['workers']} process(es)")
    return 0


def cmd_prepare(args) -> int:
    cfg = _load(args)
    from megamlm.prepare import prepare_corpus

    prepare_corpus(cfg, progress=not args.no_progress)
    return 0


def cmd_pretrain(args) -> int:
    from megamlm.pretrain import main_from_cli

    return main_from_cli(args.config, list(args.overrides), args.resume, args.init_from, args.move_old_run)


def cmd_convert(args) -> int:
    from megamlm.telemetry import setup_logging

    setup_logging("INFO")
    from megamlm.convert import main

    return main(args)


def cmd_finetune(args) -> int:
    from megamlm.finetune.train import main_from_cli

    return main_from_cli(args.config, list(args.overrides), args.resume, seeds=args.seeds, report=args.report,
                         export=args.export, move_old_run=args.move_old_run)


def cmd_bench(args) -> int:
    what = args.bench_args[0] if args.bench_args else ""
    if what == "engine":
        from megamlm import bench_engine

        return bench_engine.main(args.bench_args[1:])
    if what == "loop":
        from megamlm import bench_loop

        return bench_loop.main(args.bench_args[1:])
    if what == "loader":
        from megamlm.data import bench as data_bench

        return data_bench.main(args.bench_args[1:])
    from megamlm import bench

    return bench.main(args.bench_args)


def _move_old_run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--move-old-run", action="store_true",
                   help="start fresh in a train.output_dir that holds an earlier run: first move its files into "
                        "<name>.old-<UTC time> beside it (an outside checkpoint.dir too); what this run reads "
                        "(tokenizer, shards, --init-from) stays; nothing is deleted. Without it such a start is "
                        "refused")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megamlm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")
    _data_verbs(sub)
    _run_verbs(sub)
    p = sub.add_parser("bench", help="benchmarks: `megamlm bench model|engine|loop|loader --help`", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    return ap


def _data_verbs(sub) -> None:
    """check-config, train-tokenizer, make-shards, prepare."""
    p = sub.add_parser("check-config", help="validate a pretraining or fine-tuning config, the files it names and "
                       "its engine on this machine, and print it resolved")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--world-size", type=int, default=None, help="also check batch and topology arithmetic")
    p.add_argument("--finetune", action="store_true", help="a fine-tuning config (found by itself when it has "
                   "an init, task or head section)")
    p.add_argument("--describe", action="store_true", help="list every section and key with help text "
                   "(with --finetune: of a fine-tuning config)")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser("train-tokenizer", help="train the SentencePiece tokenizer on the corpus")
    _config_args(p)
    p.add_argument("--input", action="append", help="text file or folder (repeatable; sets data.inputs)")
    p.add_argument("--source", choices=("text", "jsonl", "wiki-vital"), help="sets data.source")
    p.add_argument("--output", help="path of the .model to write (sets tokenizer.model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer")
    p.set_defaults(fn=cmd_train_tokenizer)

    p = sub.add_parser("make-shards", help="tokenize the corpus into WebDataset shards with a manifest")
    _config_args(p)
    p.add_argument("--input", action="append", help="text file or folder (repeatable; sets data.inputs)")
    p.add_argument("--source", choices=("text", "jsonl", "wiki-vital"), help="sets data.source")
    p.add_argument("--output", help="shard folder (sets data.shards_dir)")
    p.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: data.encode_workers)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_make_shards)

    p = sub.add_parser("prepare", help="tokenizer + shards for a config, each made only if missing")
    _config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_prepare)


def _run_verbs(sub) -> None:
    """pretrain, convert, finetune."""
    p = sub.add_parser("pretrain", help="pretrain (under deepspeed, torchrun, mpirun, srun, or alone)")
    _config_args(p)
    p.add_argument("--resume", default=None,
                   help="auto (the latest complete checkpoint, if any), a checkpoint tag or folder, or none")
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from these weights only (fresh optimizer, schedule and data position): a megamlm "
                        "checkpoint folder or tag folder, a `megamlm convert --to megamlm` export, or a Hugging "
                        "Face BERT directory; ignored when --resume finds a checkpoint")
    _move_old_run_arg(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("convert", help="offline checkpoint conversion: megamlm (any ZeRO stage) <-> consolidated "
                       "fp32 <-> Hugging Face BERT")
    from megamlm.convert import add_arguments

    add_arguments(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder on a sequence / pair / token task "
                       "(a fine-tuning config: configs/finetune/*.yaml)")
    _config_args(p)
    p.add_argument("--resume", default=None, help="auto, a checkpoint tag or folder, or none")
    _move_old_run_arg(p)
    p.add_argument("--seeds", type=int, default=1, help="run N seeds (train.seed, +1, ...) under "
                   "<output_dir>/seed<k> and report the median and spread of the test metrics")
    p.add_argument("--report", action="store_true", help="write report.png / report.md / report.json")
    p.add_argument("--export", default=None, metavar="DIR", help="export the best weights to a Hugging Face "
                   "directory (BertForSequenceClassification / BertForTokenClassification)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_finetune)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may also follow the flags (argparse stops a `nargs="*"` positional at the first flag).
    stray = [r for r in rest if r.startswith("-") or "=" not in r or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    try:
        return int(args.fn(args) or 0)
    except Exception as e:  # noqa: BLE001 - MegamlmErrors print as one message, the rest as tracebacks
        from megamlm.errors import MegamlmError

        if not isinstance(e, MegamlmError):
            raise
        print(f"megamlm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megamlm {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

