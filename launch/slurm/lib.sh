# shellcheck shell=bash
# Functions shared by the scanmae Slurm templates in this folder. Sourced by the batch shell (job checks,
# head node, the per-node srun step, requeue) and again inside the step by one shell per node
# (scanmae_run_on_node). Sourcing only defines functions and one constant; nothing runs.
#
# Preemption design (launch/README.md has the long version):
#   #SBATCH --signal=USR1@120 makes Slurm send SIGUSR1 to every process of every job step (not to the batch
#   shell) 120 s before the time limit. The training ranks get it directly and pretrain/main.py finishes its
#   step, saves a checkpoint and exits with SCANMAE_REQUEUE_EXIT. The launcher between the node shell and the
#   ranks (accelerate -> torchrun agent) is started with SIGUSR1 ignored, so it neither dies (the default
#   action) nor kills the ranks while they write the checkpoint. torchrun turns a rank's exit status into a
#   plain failure, so the node shell, which traps the signal itself, reports SCANMAE_REQUEUE_EXIT when the
#   launcher fails after a signal. The batch shell sees the step's highest status and requeues on it.

# Exit status meaning "checkpoint saved after SIGUSR1/SIGTERM, continue me" (EX_TEMPFAIL, sysexits.h).
SCANMAE_REQUEUE_EXIT=75

scanmae_log() {
    printf '[scanmae %s job=%s%s] %s\n' "$(date '+%F %T')" "${SLURM_JOB_ID:-none}" \
        "${SLURM_NODEID:+ node=$SLURM_NODEID}" "$*" >&2
}

scanmae_die() {
    scanmae_log "error: $*"
    exit 2
}

# scanmae_require_job: stop with a clear message outside a Slurm allocation.
scanmae_require_job() {
    local name
    for name in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES; do
        if [[ -z ${!name:-} ]]; then
            scanmae_die "$name is not set: submit this script with sbatch (or run it inside salloc)"
        fi
    done
}

# scanmae_activate VENV: activate a virtual environment; an empty VENV keeps the current environment.
scanmae_activate() {
    local venv=$1
    [[ -z $venv ]] && return 0
    [[ -f $venv/bin/activate ]] || scanmae_die "VENV=$venv has no bin/activate (set VENV to your environment, or VENV= to keep the current one)"
    # shellcheck disable=SC1091  # the path is site-specific
    source "$venv/bin/activate"
}

# scanmae_positive_int NAME VALUE
scanmae_positive_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || scanmae_die "$1 must be a positive integer, got '$2'"
}

# scanmae_check_gpus_per_node N: N must agree with the GPUs Slurm gave each node (when Slurm says).
scanmae_check_gpus_per_node() {
    scanmae_positive_int GPUS_PER_NODE "$1"
    if [[ -n ${SLURM_GPUS_ON_NODE:-} && $SLURM_GPUS_ON_NODE != "$1" ]]; then
        scanmae_die "GPUS_PER_NODE=$1 but Slurm allocated SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE GPUs per node: make GPUS_PER_NODE and #SBATCH --gpus-per-node agree"
    fi
}

# scanmae_head_node: the first host of the allocation (it runs machine rank 0 and the rendezvous).
scanmae_head_node() {
    local -a hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    if (( ${#hosts[@]} != SLURM_JOB_NUM_NODES )); then
        scanmae_die "'scontrol show hostnames $SLURM_JOB_NODELIST' listed ${#hosts[@]} hosts, expected SLURM_JOB_NUM_NODES=$SLURM_JOB_NUM_NODES"
    fi
    printf '%s\n' "${hosts[0]}"
}

# scanmae_default_port: a rendezvous port derived from the job id, so two jobs sharing a node rarely collide.
scanmae_default_port() {
    printf '%d\n' $(( 20000 + SLURM_JOB_ID % 20000 ))
}

# scanmae_begin_job LOG_ROOT: checks, per-job log folder (exported as SCANMAE_NODE_LOG_DIR for the node
# shells), and a SIGTERM trap: a job terminated by scancel or by Slurm's own preemption is not requeued by
# us (Slurm requeues it itself when its preemption mode says so).
scanmae_begin_job() {
    local log_root=$1
    scanmae_require_job
    SCANMAE_BATCH_TERM=""
    trap 'SCANMAE_BATCH_TERM=1; scanmae_log "batch shell got SIGTERM"' TERM
    SCANMAE_NODE_LOG_DIR="$log_root/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID"
    export SCANMAE_NODE_LOG_DIR
    mkdir -p "$SCANMAE_NODE_LOG_DIR" || scanmae_die "cannot create the log folder $SCANMAE_NODE_LOG_DIR"
    scanmae_log "nodes=$SLURM_JOB_NODELIST ($SLURM_JOB_NUM_NODES) restart=${SLURM_RESTART_COUNT:-0} node logs in $SCANMAE_NODE_LOG_DIR"
}

# scanmae_srun_accelerate CONFIG GPUS_PER_NODE PORT MIXED_PRECISION SCRIPT [SCRIPT_ARGS...]
# (reads the optional MAIN_PROCESS_IP from the environment)
# Runs one srun task per node; each runs `accelerate launch` for its own GPUs. Everything that is the same
# on all nodes is expanded here; the machine rank is expanded by each node's shell from its own
# SLURM_NODEID (single quotes). An empty MIXED_PRECISION keeps the config's setting. Returns srun's status
# (the highest of the nodes').
scanmae_srun_accelerate() {
    local config=$1 gpus_per_node=$2 port=$3 mixed_precision=$4 script=$5
    shift 5
    [[ -f $config ]] || scanmae_die "accelerate config not found: $config (paths are relative to REPO_DIR=$PWD)"
    [[ -f $script ]] || scanmae_die "training script not found: $script (paths are relative to REPO_DIR=$PWD)"
    scanmae_check_gpus_per_node "$gpus_per_node"
    scanmae_positive_int MAIN_PORT "$port"
    local nodes=$SLURM_JOB_NUM_NODES head
    head=$(scanmae_head_node) || exit 2
    # MAIN_PROCESS_IP: optional site override of the address the nodes use to reach the head node
    # (e.g. its InfiniBand name or IP when the plain host name resolves to another interface)
    head=${MAIN_PROCESS_IP:-$head}
    local processes=$(( nodes * gpus_per_node ))
    if grep -Eq "^distributed_type:[[:space:]]*'?NO'?[[:space:]]*$" "$config" && (( processes != 1 )); then
        scanmae_die "$config runs a single process but the job has $nodes node(s) x $gpus_per_node GPU(s): use multi_gpu.yaml / multi_node_*.yaml"
    fi
    local -a launch_args=(--config_file "$config" --num_machines "$nodes" --num_processes "$processes"
                          --main_process_ip "$head" --main_process_port "$port")
    [[ -n $mixed_precision ]] && launch_args+=(--mixed_precision "$mixed_precision")
    local -a srun_args=(--nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=0)
    # since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; the data loaders need them
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    scanmae_log "head=$head port=$port machines=$nodes processes=$processes config=$config"
    local rc=0
    # shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node, not here
    srun "${srun_args[@]}" bash -c \
        'source "$1" && shift && scanmae_run_on_node accelerate launch --machine_rank "$SLURM_NODEID" "$@"' \
        scanmae-node "${BASH_SOURCE[0]}" "${launch_args[@]}" "$script" "$@" || rc=$?
    return "$rc"
}

# scanmae_run_on_node CMD [ARGS...]: the per-node shell. Logs to its own file, starts CMD with SIGUSR1
# ignored (see the design note at the top), waits for it through signals, and maps "failed after a
# preemption signal" to SCANMAE_REQUEUE_EXIT.
scanmae_run_on_node() {
    local node=${SLURM_NODEID:?SLURM_NODEID is not set: scanmae_run_on_node runs inside srun}
    local log_dir=${SCANMAE_NODE_LOG_DIR:?SCANMAE_NODE_LOG_DIR is not set: call scanmae_begin_job in the batch shell}
    local host=${SLURMD_NODENAME:-$(hostname)}
    local log_file="$log_dir/node${node}-${host}.log"
    mkdir -p "$log_dir"
    scanmae_log "output of node $node ($host) goes to $log_file"
    exec >>"$log_file" 2>&1
    scanmae_log "host=$host procid=${SLURM_PROCID:-?} restart=${SLURM_RESTART_COUNT:-0} cmd: $*"

    local signalled=""
    trap '' USR1
    "$@" &
    local child=$!
    trap 'signalled=USR1; scanmae_log "got SIGUSR1, waiting for the ranks to checkpoint"' USR1
    trap 'signalled=TERM; scanmae_log "got SIGTERM, waiting for the ranks to checkpoint"' TERM
    local rc=0
    while :; do
        rc=0
        wait "$child" || rc=$?
        # a trapped signal interrupts wait (status > 128) while the child still runs: wait again
        kill -0 "$child" 2>/dev/null || break
    done
    rc=0
    wait "$child" || rc=$?
    trap - USR1 TERM
    if [[ -n $signalled ]] && (( rc != 0 && rc != SCANMAE_REQUEUE_EXIT )); then
        scanmae_log "launcher exited with $rc after SIG$signalled; torchrun/accelerate report the ranks' exit status $SCANMAE_REQUEUE_EXIT as a failure, so this node reports $SCANMAE_REQUEUE_EXIT"
        rc=$SCANMAE_REQUEUE_EXIT
    fi
    scanmae_log "node $node exit status $rc"
    return "$rc"
}

# scanmae_finish STATUS MAX_REQUEUES: end the batch shell; on SCANMAE_REQUEUE_EXIT requeue the job (same job
# id, SLURM_RESTART_COUNT + 1; the training script resumes from its last checkpoint).
scanmae_finish() {
    local rc=$1 max_requeues=$2
    if (( rc == SCANMAE_REQUEUE_EXIT )); then
        local restarts=${SLURM_RESTART_COUNT:-0}
        if [[ -n ${SCANMAE_BATCH_TERM:-} ]]; then
            scanmae_log "checkpointed, but the job itself was terminated (scancel or Slurm preemption): not requeueing"
        elif (( restarts >= max_requeues )); then
            scanmae_log "checkpointed, but the job was already requeued $restarts times (MAX_REQUEUES=$max_requeues): not requeueing"
        else
            scanmae_log "checkpointed after a preemption signal: requeueing (restart $(( restarts + 1 )) of at most $max_requeues)"
            scontrol requeue "$SLURM_JOB_ID" || scanmae_log "error: 'scontrol requeue $SLURM_JOB_ID' failed (was the job submitted with --requeue?)"
        fi
    else
        scanmae_log "finished with exit status $rc"
    fi
    exit "$rc"
}
