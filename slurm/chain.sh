#!/usr/bin/env bash
# Chain N jobs of slurm/pretrain.sbatch for a run longer than the partition's time limit: each job starts
# when the one before it ends (--dependency=afterany), resumes from the latest checkpoint (--resume auto)
# in one shared run folder, and stops 10 minutes before its limit with a checkpoint (SIGUSR1). Jobs left
# over after the run completes find run_status "complete" and end at once. Self-requeue is turned off
# (MEGAMLM_REQUEUE=0) so exactly N jobs run; use it where requeue is not allowed, or to bound the cost.
#
#   slurm/chain.sh N [sbatch options ...] -- CONFIG [section.key=value ...]
#   slurm/chain.sh 10 --nodes=8 --time=24:00:00 -- configs/bert-large.yaml
#
# The run folder is MEGAMLM_RUN_DIR if set, else runs/<config stem>-<first job id> (the first job's own
# default). Prints the job ids, one per line. An equivalent with one submission: a job array run one task
# at a time, whose run folder is named by the array's job id:
#   MEGAMLM_REQUEUE=0 sbatch --array=1-10%1 --nodes=8 slurm/pretrain.sbatch configs/bert-large.yaml
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() { echo "usage: $0 N [sbatch options ...] -- CONFIG [section.key=value ...]" >&2; exit 2; }
[ $# -ge 3 ] || usage
n=$1
shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "chain.sh: N must be a positive number of jobs, got '$n'" >&2; exit 2; }
opts=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
[ $# -ge 2 ] || usage
shift  # --
config=$1
[ -f "$config" ] || { echo "chain.sh: config file '$config' not found" >&2; exit 2; }
stem=$(basename "$config")
stem=${stem%.*}
export MEGAMLM_REQUEUE=0
first=$(sbatch --parsable "${opts[@]}" "$here/pretrain.sbatch" "$@")
first=${first%%;*}
echo "$first"
export MEGAMLM_RUN_DIR=${MEGAMLM_RUN_DIR:-runs/$stem-$first}
prev=$first
for ((i = 2; i <= n; i++)); do
  prev=$(sbatch --parsable --dependency="afterany:$prev" "${opts[@]}" "$here/pretrain.sbatch" "$@")
  prev=${prev%%;*}
  echo "$prev"
done
echo "chain.sh: $n job(s), run folder $MEGAMLM_RUN_DIR" >&2
