#!/usr/bin/env bash
# The README's main job: set up, then run the flow on the default corpus with configs/tiny-cpu.yaml.
# Today that is the first two stages (SentencePiece tokenizer → WebDataset shards); pretraining with
# 2 processes joins here when `megamlm pretrain` lands. Extra arguments are config overrides.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh
venv=${MEGAMLM_VENV:-$root/.venv}
"$venv/bin/megamlm" prepare configs/tiny-cpu.yaml "$@"
"$venv/bin/python" - <<'PY'
import json
m = json.load(open("runs/wiki-vital/shards/manifest.json"))
for split, v in m["splits"].items():
    t = v["totals"]
    print(f"{split}: {len(v['shards'])} shard(s), {t['documents']} documents, {t['sentences']} sentences, {t['tokens']} tokens")
print("skipped:", m["skipped"], "| tokenizer:", m["tokenizer"]["path"], m["tokenizer"]["sha256"][:12])
PY
