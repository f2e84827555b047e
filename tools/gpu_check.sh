#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, possibly with no network, run the tests, the BERT-base
# benchmarks against Hugging Face and a few minutes of pretraining with NCCL, and write a report
# (runs/gpu_check/report.json and report.md; the README's GPU section is written from it).
#
#   tools/gpu_check.sh [--wheels DIR] [--out DIR] [--no-tests] [--only STAGE,...] [--shards DIR --tokenizer M]
#   tools/gpu_check.sh --smoke [--no-tests]     every stage at a toy size on the CPU: checks the script
#
# Python: $PYTHON, else .venv/bin/python when tools/setup.sh made one, else python3 (a machine's own Python
# with a CUDA torch). --wheels DIR (from tools/setup.sh --build-wheels DIR): first install megamlm and its
# dependencies from DIR into a virtual environment over that Python's packages (its torch kept), with no
# network. The shards of the default corpus must exist (megamlm prepare configs/tiny-cpu.yaml makes
# runs/wiki-vital; carry that folder to a machine without the corpus package). Stages: tools/gpu_check.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
fi
args=()
wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=${2:?"--wheels DIR"}; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  env_dir=${MEGAMLM_CHECK_VENV:-/tmp/megamlm-gpu-check-venv}
  [ -x "$env_dir/bin/python" ] || "$py" -m venv --system-site-packages "$env_dir"
  PYTHON="$env_dir/bin/python" bash "$root/tools/setup.sh" --wheels "$wheels"
  py=$env_dir/bin/python
fi
[[ " ${args[*]+"${args[*]}"} " == *" --shards "* ]] || [ -f "$root/runs/wiki-vital/shards/manifest.json" ] \
  || echo "[gpu_check] runs/wiki-vital/shards is missing: the pretrain stage will fail (megamlm prepare configs/tiny-cpu.yaml)" >&2
cd "$root"
exec "$py" "$root/tools/gpu_check.py" "${args[@]+"${args[@]}"}"
