#!/usr/bin/env bash
# A Slurm job array: one vmig worker per array task. vmig reads
# SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (and SLURM_ARRAY_TASK_MIN)
# and takes the chunks with id % COUNT == TASK_ID - MIN; a requeued task
# resumes its shard. Submit the export, then the import after it:
#
#   jid=$(sbatch --parsable --array=0-7 deploy/slurm/vmig-array.sh export)
#   sbatch --dependency=afterok:$jid --array=0-7 deploy/slurm/vmig-array.sh import
#
# Credentials come from the environment of the submitting shell or a
# file only the job's user can read (sourced below); never from the command line.
#SBATCH --job-name=vmig
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=2-00:00:00
#SBATCH --requeue
#SBATCH --output=vmig-%A_%a.log
set -euo pipefail
[ -f "$HOME/.vmig.env" ] && . "$HOME/.vmig.env"   # PG_URL, OCEANBASE_URL, AWS_* …
STAGING="${VMIG_STAGING:-s3://vmig-staging/fastgpt-2026-11}"
export VMIG_STATE_ROOT="${TMPDIR:-/tmp}/vmig-$SLURM_JOB_ID"
case "${1:?export or import}" in
  export) exec vmig export --from PG_URL --table modeldata --staging "$STAGING" --workers 2 --quiet ;;
  import) exec vmig import --to OCEANBASE_URL --staging "$STAGING" --workers 2 --quiet ;;
  *) echo "usage: sbatch --array=0-N $0 export|import" >&2; exit 2 ;;
esac
