#!/bin/bash
# Train K models as a SLURM job array of parts, requeue parts on preemption, merge at the end.
#
#   JAXMEM_OUT=runs/vgg-c10 JAXMEM_NUM_MODELS=2000 JAXMEM_NUM_PARTS=20 \
#   JAXMEM_RUN_ARGS="--arch=small_vgg --dataset=cifar10 --epochs=100" \
#       bash experiments/cluster/ensemble_array.sh submit
#
# `submit` (run from anywhere) queues the array (this script in `part` mode, one task per part)
# and a merge job (`merge` mode) that starts after every part succeeded (afterok). Part I
# trains models [I*K/P, (I+1)*K/P) with --model-range into $JAXMEM_OUT.parts/part-I. About 120 s
# before its time limit (--signal=B:USR1@120), on preemption (SIGTERM) or on a forwarded
# USR1, the run checkpoints the step in progress and exits with status 75; the part then
# requeues itself and, started again, continues with --resume. A finished part is not trained
# again. `part` and `merge` also run outside SLURM (set SLURM_ARRAY_TASK_ID for `part`).
#
# Settings (environment; sbatch passes it on): JAXMEM_OUT (the merged run directory),
# JAXMEM_NUM_MODELS (K), JAXMEM_NUM_PARTS (P), JAXMEM_RUN_ARGS (flags of experiments/run.py
# shared by all parts), JAXMEM_PYTHON (default python3), JAXMEM_SBATCH_ARGS (extra sbatch
# options for both jobs, e.g. "--partition=gpu --gres=gpu:1 --time=12:00:00").
#
#SBATCH --job-name=jaxmem
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=jaxmem-%A_%a.log

set -u
CHECKPOINTED=75  # the run's exit status after checkpointing on SIGTERM/SIGUSR1
PYTHON=${JAXMEM_PYTHON:-python3}

# Models [start, stop) of part $1 of JAXMEM_NUM_PARTS, as START:END.
part_range() {
    local part=$1 k=$JAXMEM_NUM_MODELS p=$JAXMEM_NUM_PARTS
    echo "$((part * k / p)):$(((part + 1) * k / p))"
}

part_dir() { echo "$JAXMEM_OUT.parts/part-$1"; }

# Run "$@" in the background and forward USR1 and TERM to it (the batch shell is what SLURM
# signals); returns its exit status.
run_forwarding() {
    local child=""
    trap '[[ -n $child ]] && kill -USR1 "$child" 2>/dev/null' USR1
    trap '[[ -n $child ]] && kill -TERM "$child" 2>/dev/null' TERM
    "$@" &
    child=$!
    while kill -0 "$child" 2>/dev/null; do
        wait "$child"  # returns early when a trapped signal arrives; wait again
    done
    wait "$child"
    local status=$?
    trap - USR1 TERM
    return "$status"
}

part() {
    local part=${SLURM_ARRAY_TASK_ID:?part mode needs SLURM_ARRAY_TASK_ID}
    local out
    out=$(part_dir "$part")
    if [[ -f $out/metrics.json ]]; then
        echo "part $part: $out is finished"
        return 0
    fi
    local resume=()
    [[ -d $out.partial ]] && resume=(--resume)
    mkdir -p "$(dirname "$out")"
    # shellcheck disable=SC2086  # JAXMEM_RUN_ARGS is a list of flags
    run_forwarding "$PYTHON" experiments/run.py $JAXMEM_RUN_ARGS \
        --num-models="$JAXMEM_NUM_MODELS" --model-range="$(part_range "$part")" \
        --out="$out" --no-progress "${resume[@]}"
    local status=$?
    if [[ $status == "$CHECKPOINTED" && -n ${SLURM_JOB_ID:-} ]]; then
        echo "part $part: checkpointed; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}

merge() {
    local parts=() part
    for ((part = 0; part < JAXMEM_NUM_PARTS; part++)); do
        parts+=("$(part_dir "$part")")
    done
    "$PYTHON" experiments/cluster/merge.py "${parts[@]}" --out "$JAXMEM_OUT"
}

submit() {
    local array merge_job
    # shellcheck disable=SC2086  # JAXMEM_SBATCH_ARGS is a list of options
    array=$(sbatch --parsable ${JAXMEM_SBATCH_ARGS:-} --array=0-$((JAXMEM_NUM_PARTS - 1)) \
        "$SCRIPT" part) || return
    # shellcheck disable=SC2086
    merge_job=$(sbatch --parsable ${JAXMEM_SBATCH_ARGS:-} --dependency=afterok:"$array" \
        --job-name=jaxmem-merge --output=jaxmem-merge-%j.log "$SCRIPT" merge) || return
    echo "parts: job array $array; merge: job $merge_job -> $JAXMEM_OUT"
}

SCRIPT=$(realpath "$0")
ROOT=$(dirname "$SCRIPT")/../..
case ${1:-} in
    submit) cd "$ROOT" && submit ;;
    # jobs run where they were submitted from (the repository root), not from SLURM's copy
    part | merge) cd "${SLURM_SUBMIT_DIR:-$ROOT}" && "$1" ;;
    *) echo "usage: $0 submit|part|merge (settings: see the top of this script)" >&2; exit 2 ;;
esac
