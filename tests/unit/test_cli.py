"""`megamlm check-config` against the files a config names, and the file checks pretrain's preflight shares
(megamlm/preflight.py): real SentencePiece models and real shard folders made by make_shards.

A failure points at megamlm/preflight.py (check_files / file_checks) or megamlm/cli.py (cmd_check_config).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megamlm.cli import main
from megamlm.config import load_config
from megamlm.preflight import check_files, file_checks
from tests import data_fixtures as fx

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def check_config(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["check-config", str(TINY), *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tok_pad1(tmp_path_factory) -> Path:
    """A second tokenizer (other pieces, another sha256), its vocabulary padded to a multiple of 1: 600 rows."""
    from megamlm.tokenizer import train_tokenizer

    sents = [s for d in fx.fake_documents(300, seed=7) for s in d]
    path = tmp_path_factory.mktemp("tok1") / "spm.model"
    tok = train_tokenizer(sents, path, vocab_size=600, model_type="bpe", pad_multiple=1, threads=1)
    assert tok.padded_vocab_size == 600
    return path


@pytest.fixture(scope="module")
def no_val_shards(tmp_path_factory) -> Path:
    from megamlm.data.shards import make_shards

    d = tmp_path_factory.mktemp("noval")
    text = d / "corpus.txt"
    text.write_text("\n\n".join("\n".join(doc) for doc in fx.fake_documents(60, seed=3)) + "\n", encoding="utf-8")
    cfg = fx.data_config(d / "shards", "data.source=text", f"data.inputs=[{text}]", "data.sentences=lines",
                         "data.val_fraction=0")
    make_shards(cfg, fx.tokenizer_path(), workers=1, progress=False)
    return d / "shards"


def files(tok: Path, shards: Path) -> list[str]:
    return [f"tokenizer.model={tok}", f"data.shards_dir={shards}"]


def test_vocab_parallel_checked_against_the_tokenizers_padded_vocabulary(capsys, tok_pad1, tmp_path):
    """The issue's case: pieces padded to a multiple of 1 split over 5 ranks (600 / 5 = 120) is valid,
    though pad_vocab_to_multiple=1 is not a multiple of 5; 7 ranks are refused, naming 600 and the keys."""
    rc, out, err = check_config(capsys, *files(tok_pad1, tmp_path / "shards"), "parallel.vocab_parallel_size=5",
                                "tokenizer.pad_vocab_to_multiple=1", "--world-size", "5")
    assert rc == 0, err
    assert "data-parallel 1 x vocab-parallel 5" in out
    rc, _, err = check_config(capsys, *files(tok_pad1, tmp_path / "shards"), "parallel.vocab_parallel_size=7",
                              "tokenizer.pad_vocab_to_multiple=1", "--world-size", "7")
    assert rc == 2
    assert "parallel.vocab_parallel_size=7 does not divide the padded vocabulary of 600 rows" in err, err
    assert f"{tok_pad1}': 600 pieces, padded to 600" in err
    assert "set model.vocab_size to a multiple of 7" in err and "e.g. 602" in err
    assert "a divisor of 600 (e.g. 6)" in err and "tokenizer.pad_vocab_to_multiple a multiple of 7" in err


def test_padding_multiple_of_the_config_differs_from_the_tokenizers(capsys):
    """The fixture tokenizer was padded to 128 (640 rows): tokenizer.pad_vocab_to_multiple=1 does not re-pad it,
    and the message says so."""
    rc, _, err = check_config(capsys, *files(fx.tokenizer_path(), fx.shards()), "parallel.vocab_parallel_size=3",
                              "tokenizer.pad_vocab_to_multiple=1")
    assert rc == 2 and "padded vocabulary of 640 rows" in err, err
    assert "tokenizer.pad_vocab_to_multiple=1 applies when a tokenizer is trained: this one was padded to a " \
           "multiple of 128" in err


def test_the_real_issue_command_through_the_console(tok_pad1, tmp_path):
    r = subprocess.run([sys.executable, "-m", "megamlm", "check-config", str(TINY), *files(tok_pad1, tmp_path),
                        "parallel.vocab_parallel_size=5", "tokenizer.pad_vocab_to_multiple=1", "--world-size", "5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"# not checked: data.shards_dir '{tmp_path}' has no manifest.json yet (megamlm prepare makes it)" \
           in r.stderr
    assert "# configuration is valid as far as checked (1 check(s) not run, above)" in r.stderr


def test_shards_made_with_another_tokenizer_are_refused(capsys, tok_pad1):
    rc, _, err = check_config(capsys, *files(tok_pad1, fx.shards()), "--world-size", "2")
    assert rc == 2
    assert "was made with tokenizer sha256" in err and f"the configured tokenizer {tok_pad1}" in err, err
    assert "Traceback" not in err


def test_all_checks_done_is_said_so(capsys):
    rc, out, err = check_config(capsys, *files(fx.tokenizer_path(), fx.shards()), "--world-size", "2")
    assert rc == 0, err
    assert "# not checked" not in err
    assert err.strip().splitlines()[-1] == "# configuration is valid, its tokenizer and shards too"


def test_what_cannot_be_checked_is_said_plainly(capsys, tmp_path):
    empty = tmp_path / "shards"
    empty.mkdir()
    rc, _, err = check_config(capsys, *files(tmp_path / "tok" / "spm.model", empty))
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert lines == [
        f"# not checked: tokenizer.model '{tmp_path}/tok/spm.model' does not exist yet (megamlm prepare makes "
        "it): its padded vocabulary against parallel.vocab_parallel_size and model.vocab_size, and that the "
        "shards were made with it",
        f"# not checked: data.shards_dir '{empty}' has no manifest.json yet (megamlm prepare makes it): its "
        "shards, their tokenizer and the validation split",
        "# not checked: the batch and topology arithmetic (pass --world-size N)",
        "# configuration is valid as far as checked (3 check(s) not run, above)",
    ], lines


def test_listed_shards_that_are_gone_are_refused_unless_skipped(capsys, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(fx.shards(), shards)
    (shards / "train-000001.tar").unlink()
    rc, _, err = check_config(capsys, *files(fx.tokenizer_path(), shards))
    assert rc == 2
    assert f"{shards}: 1 of the " in err and "listed in manifest.json are missing (train-000001.tar)" in err, err
    rc, _, err = check_config(capsys, *files(fx.tokenizer_path(), shards), "data.on_error=skip")
    assert rc == 0, err


def test_config_and_file_problems_come_out_as_one_error(capsys, tok_pad1):
    rc, out, err = check_config(capsys, *files(tok_pad1, fx.shards()), "engine.zero_stage=7",
                                "parallel.vocab_parallel_size=7")
    assert rc == 2 and out == ""
    assert "(3 problems)" in err, err
    assert "engine.zero_stage=7" in err and "does not divide the padded vocabulary of 600 rows" in err
    assert "was made with tokenizer sha256" in err
    assert "configs/tiny-cpu.yaml" in err  # the file the problems are in


def test_file_checks_for_preflight_name_the_missing_files(tmp_path):
    """pretrain refuses to start without its files: file_checks gives check_files' problems plus the
    missing files, each naming the command that makes it."""
    cfg = load_config(TINY, files(tmp_path / "spm.model", tmp_path / "shards"))
    assert file_checks(cfg) == [
        f"tokenizer model '{tmp_path}/spm.model' does not exist (train one with `megamlm train-tokenizer CONFIG`)",
        f"no manifest.json in {tmp_path}/shards: run `megamlm make-shards` first",
    ]
    assert check_files(cfg).problems == []


def test_file_checks_validation_shards_and_model_vocab_size(no_val_shards):
    cfg = load_config(TINY, files(fx.tokenizer_path(), no_val_shards) + ["train.eval_every=5"])
    assert file_checks(cfg) == [f"{no_val_shards} has no validation shards but train.eval_every=5; set "
                                "train.eval_every=0 or data.val_fraction > 0"]
    assert file_checks(load_config(TINY, files(fx.tokenizer_path(), no_val_shards) + ["train.eval_every=0"])) == []
    small = load_config(TINY, files(fx.tokenizer_path(), no_val_shards) + ["train.eval_every=0",
                                                                          "model.vocab_size=512"])
    assert file_checks(small) == [f"model.vocab_size=512 is smaller than the padded vocabulary 640 of "
                                  f"tokenizer.model '{fx.tokenizer_path()}'; set model.vocab_size=0 (the "
                                  "tokenizer's) or >= 640"]


def test_broken_files_are_problems_not_gaps(tmp_path):
    tok = tmp_path / "spm.model"
    shutil.copy(fx.tokenizer_path(), tok)
    shutil.copy(fx.tokenizer_path().with_suffix(".json"), tok.with_suffix(".json"))
    tok.with_suffix(".json").write_text("{not json")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"format": "something else"}))
    r = check_files(load_config(TINY, files(tok, shards)))
    assert r.missing == [] and r.unchecked == []
    assert len(r.problems) == 2, r.problems
    assert "sidecar" in r.problems[0] and "not valid JSON" in r.problems[0]
    assert f"{shards}/manifest.json: format 'something else'" in r.problems[1]


def test_fields_that_failed_are_skipped_not_raised_on(capsys):
    rc, _, err = check_config(capsys, *files(fx.tokenizer_path(), fx.shards()), "parallel.vocab_parallel_size=x",
                              "train.eval_every=[1]", "--world-size", "2")
    assert rc == 2 and "Traceback" not in err
    assert "(2 problems)" in err, err
