#!/usr/bin/env bash
# The README's main job: set up, then the whole flow on the default corpus with configs/tiny-cpu.yaml:
# SentencePiece tokenizer → WebDataset shards → pretraining of a tiny BERT with 2 CPU processes through
# the deepspeed launcher (TensorBoard logs and checkpoints under runs/tiny-cpu). Extra arguments are
# config overrides for the pretraining, e.g. `bash tools/demo.sh train.max_steps=100`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh
venv=${MEGAMLM_VENV:-$root/.venv}
"$venv/bin/megamlm" prepare configs/tiny-cpu.yaml
"$venv/bin/python" - <<'PY'
import json
m = json.load(open("runs/wiki-vital/shards/manifest.json"))
for split, v in m["splits"].items():
    t = v["totals"]
    print(f"{split}: {len(v['shards'])} shard(s), {t['documents']} documents, {t['sentences']} sentences, {t['tokens']} tokens")
print("skipped:", m["skipped"], "| tokenizer:", m["tokenizer"]["path"], m["tokenizer"]["sha256"][:12])
PY

# 2 processes on 2 cores: one thread each (the deepspeed launcher does not set it; see README).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} PATH="$venv/bin:$PATH"
deepspeed --num_accelerators 2 --no_local_rank --module megamlm pretrain configs/tiny-cpu.yaml --resume auto "$@"
echo "TensorBoard: $venv/bin/tensorboard --logdir runs/tiny-cpu/tb"
