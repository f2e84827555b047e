"""megamlm's SentencePiece model → a Hugging Face fast tokenizer (``tokenizer.json`` and friends).

Built directly with ``tokenizers`` from the .model's pieces (no transformers converter: ours pins every
setting megamlm trains with):

* model: ``Unigram`` (pieces + scores) or ``BPE`` (vocab + merges derived from the pieces, ranked by the
  merged piece's id = SentencePiece's score order), both with byte fallback;
* no normaliser (megamlm trains with the identity rule and keeps whitespace);
* ``Metaspace("▁", prepend_scheme="always", split=True)``: SentencePiece's dummy prefix on every text and
  a word boundary before every "▁";
* control, byte and unknown pieces can never be matched from text (SentencePiece never does): they are
  left out of BPE merges and get a prohibitive Unigram score (a constant offset for unknown characters,
  which every segmentation covers the same way);
* post-processor ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` with token_type_ids 0 / 1;
* decoder: "▁" → " ", byte fallback, fuse, strip the dummy prefix.

Ids equal SentencePiece's on every sentence of the default corpus (tests/e2e/test_convert_e2e.py).
One documented difference: the special tokens' literal text ("[MASK]") is matched as the special token,
as every HF BERT tokenizer does (fill-mask pipelines rely on it); megamlm's SentencePiece encodes it as
characters. The corpus never contains them.
"""

from __future__ import annotations

import json
from pathlib import Path

from megamlm.tokenizer import CLS, MASK, PAD, SEP, UNK, WORD_START

__all__ = ["build_fast_tokenizer", "save_hf_tokenizer"]

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_NEVER = -1e9  # a Unigram score that no segmentation with an alternative ever picks


def _proto(model_path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        m.ParseFromString(Path(model_path).read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ValueError(f"{model_path}: not a SentencePiece model ({e})") from None
    return m


def _check_settings(m, model_path: Path) -> None:
    """Refuse models whose settings the fast tokenizer below would not reproduce."""
    ns, ts = m.normalizer_spec, m.trainer_spec
    problems = []
    if ns.name not in ("identity", "") or len(ns.precompiled_charsmap):
        problems.append(f"normaliser {ns.name!r} (only 'identity' is converted)")
    if ns.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if not ns.add_dummy_prefix:
        problems.append("add_dummy_prefix=false")
    if ts.treat_whitespace_as_suffix or ts.allow_whitespace_only_pieces or not ts.split_by_whitespace:
        problems.append("non-default whitespace handling")
    if not ts.byte_fallback:
        problems.append("byte_fallback=false")
    if problems:
        raise ValueError(f"{model_path}: cannot convert to a fast tokenizer with equal ids: " + "; ".join(problems))


def build_fast_tokenizer(model_path: str | Path):
    """A ``tokenizers.Tokenizer`` giving the same ids as the SentencePiece model at ``model_path``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: F401

    model_path = Path(model_path)
    m = _proto(model_path)
    _check_settings(m, model_path)
    pieces = [(p.piece, p.score, p.type) for p in m.pieces]
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    for name in (PAD, UNK, CLS, SEP, MASK):
        if name not in ids:
            raise ValueError(f"{model_path}: special piece {name} is missing")
    unk_id = ids[UNK]
    kind = m.trainer_spec.model_type  # 1 unigram, 2 bpe
    if kind == 1:
        vocab = [(p, s if t in (_NORMAL, _USER_DEFINED) else _NEVER) for p, s, t in pieces]
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=True)
    elif kind == 2:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        normal = {p for p, _, t in pieces if t == _NORMAL}
        merges = []
        for p, _, t in pieces:
            if t != _NORMAL or len(p) < 2:
                continue
            for k in range(1, len(p)):
                a, b = p[:k], p[k:]
                if a in normal and b in normal:
                    merges.append((ids[p], ids[a], ids[b], a, b))
        merges.sort()
        model = models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=UNK, byte_fallback=True,
                           fuse_unk=False)
    else:
        raise ValueError(f"{model_path}: SentencePiece model type {kind} (only unigram and bpe are converted)")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace(WORD_START, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, UNK, CLS, SEP, MASK)])
    cls, sep = ids[CLS], ids[SEP]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0", pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, cls), (SEP, sep)])
    return tok


def save_hf_tokenizer(model_path: str | Path, out_dir: str | Path, model_max_length: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_fast_tokenizer(model_path)
    tok.save(str(out / "tokenizer.json"))
    specials = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
           "clean_up_tokenization_spaces": False, "do_lower_case": False,
           "model_input_names": ["input_ids", "token_type_ids", "attention_mask"], **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
