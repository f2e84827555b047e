#!/usr/bin/env bash
# The allocation's hosts, for slurm/pretrain.sbatch (sourced) or by hand (run):
#
#   slurm/hosts.sh nodes                  one host per line (scontrol show hostnames $SLURM_JOB_NODELIST)
#   slurm/hosts.sh master                 the first host, checked to resolve (MASTER_ADDR of the job)
#   slurm/hosts.sh hostfile FILE [SLOTS]  a DeepSpeed hostfile: "host slots=SLOTS" per node; SLOTS defaults
#                                         to the GPUs per node, else the tasks per node
#
# Reads SLURM_JOB_NODELIST (or SLURM_NODELIST), SLURM_GPUS_ON_NODE, SLURM_NTASKS_PER_NODE,
# SLURM_TASKS_PER_NODE. Every failure prints one line naming the variable and value, and returns 2.
# distributed/env.py resolves the same first host for srun's tasks; this file serves the batch shell.

megamlm_nodes() {
  local list=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
  if [ -z "$list" ]; then
    echo "megamlm slurm: error: SLURM_JOB_NODELIST is not set (not inside a Slurm allocation?)" >&2
    return 2
  fi
  local out
  if ! out=$(timeout 20 scontrol show hostnames "$list" 2>&1) || [ -z "$out" ]; then
    echo "megamlm slurm: error: cannot expand the node list SLURM_JOB_NODELIST='$list' with" \
         "'scontrol show hostnames': ${out//$'\n'/ }" >&2
    return 2
  fi
  printf '%s\n' "$out"
}

megamlm_master() {
  local hosts first
  hosts=$(megamlm_nodes) || return 2
  first=${hosts%%$'\n'*}
  if ! getent hosts "$first" >/dev/null 2>&1; then
    echo "megamlm slurm: error: the first host of the allocation, '$first'" \
         "(SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}'), does not resolve to an address" \
         "on $(hostname); fix the site's name service or export MASTER_ADDR" >&2
    return 2
  fi
  printf '%s\n' "$first"
}

# Slots (processes) per node: the GPUs on the node, else the tasks per node of the allocation.
megamlm_slots() {
  local s=${SLURM_GPUS_ON_NODE:-0}
  [ "$s" -gt 0 ] 2>/dev/null && { echo "$s"; return; }
  s=${SLURM_NTASKS_PER_NODE:-}
  [ -n "$s" ] && { echo "$s"; return; }
  s=${SLURM_TASKS_PER_NODE:-1}  # e.g. "8(x4)" or "8(x2),4": the first node's count
  echo "${s%%[(,]*}"
}

megamlm_hostfile() {
  local file=$1 slots=${2:-} hosts h
  [ -n "$file" ] || { echo "megamlm slurm: error: hostfile needs a FILE" >&2; return 2; }
  [ -n "$slots" ] || slots=$(megamlm_slots)
  hosts=$(megamlm_nodes) || return 2
  mkdir -p "$(dirname "$file")"
  : > "$file"
  for h in $hosts; do echo "$h slots=$slots" >> "$file"; done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
  set -uo pipefail
  cmd=${1:-}
  shift || true
  case "$cmd" in
    nodes) megamlm_nodes ;;
    master) megamlm_master ;;
    hostfile) megamlm_hostfile "$@" && cat "$1" ;;
    *) echo "usage: $0 nodes | master | hostfile FILE [SLOTS]" >&2; exit 2 ;;
  esac
fi
