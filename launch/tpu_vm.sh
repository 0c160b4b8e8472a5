#!/usr/bin/env bash
# Run lmc_jax on a Cloud TPU VM, and keep it running through preemptions.
#
#   launch/tpu_vm.sh                # create (or reuse) the TPU, install, run, watch, relaunch
#   launch/tpu_vm.sh status         # state of the TPU and of the job
#   launch/tpu_vm.sh logs           # last lines of the job's log on worker 0
#   launch/tpu_vm.sh delete         # delete the TPU (and the queued resource)
#
# Run it from the repository root on a machine with gcloud (authenticated, `gcloud config set
# project ...`). Every setting below can be overridden from the environment, e.g.
#   ZONE=us-central2-b ACCELERATOR=v4-8 RUNTIME=tpu-ubuntu2204-base launch/tpu_vm.sh
#
# What it does, in a loop until the job exits 0:
#   1. create the TPU VM, either through a queued resource (USE_QUEUED_RESOURCE=1, the way to get
#      spot / large slices) or directly (`tpu-vm create`), and wait until it is READY / ACTIVE;
#   2. copy this checkout (or clone REPO_URL) and `pip install -e . "jax[tpu]==0.10.2"` on every
#      worker (`gcloud compute tpus tpu-vm ssh --worker=all`);
#   3. start `python -m lmc_jax.main --config=$CONFIG --workdir=$WORKDIR` detached on every worker;
#   4. poll: the job's exit status file on worker 0, and the TPU / queued-resource state. On
#      preemption (state PREEMPTED / SUSPENDED / gone, or exit status 143 = SIGTERM, which
#      lmc_jax.main uses after saving a checkpoint) delete and recreate the TPU and go to 2.
#      Resume is automatic: lmc_jax restores the last checkpoint from WORKDIR.
#
# WORKDIR must survive the VM: a spot TPU's disk is deleted with it. Set GCS_BUCKET and the
# script mounts it on every worker with gcsfuse (at ~/gcs) and uses ~/gcs/RUN_NAME as workdir
# (lmc_jax writes with plain file I/O; a gs:// workdir string is not supported). Without a bucket
# the workdir is local to the VM and a preemption restarts the run from step 0.
#
# Multi-host slices (more than one worker, e.g. v4-16, v5litepod-16): the job runs on every
# worker with LMC_JAX_DISTRIBUTED=1, so lmc_jax.main calls jax.distributed.initialize() first
# (Cloud TPU fills in the coordinator); process 0 writes the outputs. Use GCS_BUCKET there: the
# checkpoints need a directory that all workers share.
set -euo pipefail

# ---- settings --------------------------------------------------------------------------------
if ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)" \
    "and run gcloud auth login" >&2
  exit 2
fi
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
ZONE="${ZONE:-us-central1-a}"
ACCELERATOR="${ACCELERATOR:-v5litepod-8}"      # v4-8, v5litepod-8, v6e-8, v4-16 (2 workers) ...
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"       # v4: tpu-ubuntu2204-base; v6e: v2-alpha-tpuv6e
TPU_NAME="${TPU_NAME:-lmc-jax-tpu}"
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
USE_QUEUED_RESOURCE="${USE_QUEUED_RESOURCE:-1}" # 1: queued resource; 0: tpu-vm create
SPOT="${SPOT:-1}"                               # 1: spot capacity (preemptible); 0: on-demand
CONFIG="${CONFIG:-configs/t23d.py}"             # plus preset, e.g. configs/t23d.py:tiny
RUN_NAME="${RUN_NAME:-t23d}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                    # shell words: '--config.prompt="a red fox"' ...
GCS_BUCKET="${GCS_BUCKET:-}"                    # e.g. my-bucket (no gs://); empty: local workdir
REPO_URL="${REPO_URL:-}"                        # empty: copy this checkout to the workers
JAX_VERSION="${JAX_VERSION:-0.10.2}"
POLL_SECONDS="${POLL_SECONDS:-60}"             # between checks of a running job
WAIT_SECONDS="${WAIT_SECONDS:-30}"              # between tries while the TPU comes up or goes
MAX_RELAUNCHES="${MAX_RELAUNCHES:-50}"
DELETE_WHEN_DONE="${DELETE_WHEN_DONE:-1}"       # delete the TPU after the job succeeded
OUT_DIR="${OUT_DIR:-.}"                         # without GCS_BUCKET: where RUN_NAME-out.tar.gz goes

REMOTE_REPO="lmc_jax"                           # in the remote home directory
REMOTE_VENV="lmc_venv"
if [[ -n "$GCS_BUCKET" ]]; then
  WORKDIR="${WORKDIR:-gcs/$RUN_NAME}"           # relative to the remote home
else
  WORKDIR="${WORKDIR:-runs/$RUN_NAME}"
fi

# ---- helpers ---------------------------------------------------------------------------------
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

gc() { gcloud --quiet --project="$PROJECT" "$@"; }

tpu_ssh() {  # tpu_ssh WORKER COMMAND
  gc compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

# Prints READY / ACTIVE / PREEMPTED / SUSPENDED / CREATING / ... or NOT_FOUND.
tpu_state() {
  local s
  if [[ "$USE_QUEUED_RESOURCE" == 1 ]]; then
    s="$(gc compute tpus queued-resources describe "$QR_NAME" --zone="$ZONE" \
          --format='value(state.state)' 2>/dev/null)" || s=""
    if [[ "$s" == ACTIVE ]]; then  # the node itself can still be PREEMPTED
      s="$(gc compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
            --format='value(state)' 2>/dev/null)" || s="NOT_FOUND"
      [[ "$s" == READY ]] && s="ACTIVE"
    fi
  else
    s="$(gc compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
          --format='value(state)' 2>/dev/null)" || s=""
  fi
  echo "${s:-NOT_FOUND}"
}

delete_tpu() {
  log "deleting $TPU_NAME"
  if [[ "$USE_QUEUED_RESOURCE" == 1 ]]; then
    gc compute tpus queued-resources delete "$QR_NAME" --zone="$ZONE" --force || true
  else
    gc compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" || true
  fi
  while [[ "$(tpu_state)" != NOT_FOUND ]]; do sleep "$WAIT_SECONDS"; done
}

create_tpu() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  log "creating $TPU_NAME ($ACCELERATOR, $RUNTIME, spot=$SPOT) in $ZONE"
  if [[ "$USE_QUEUED_RESOURCE" == 1 ]]; then
    gc compute tpus queued-resources create "$QR_NAME" --zone="$ZONE" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${spot[@]}"
  else
    gc compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
  fi
}

# Creates the TPU if needed and waits until it is usable; recreates it after a preemption.
ensure_tpu() {
  local s
  while true; do
    s="$(tpu_state)"
    case "$s" in
      READY|ACTIVE) return 0 ;;
      NOT_FOUND) create_tpu || log "create failed (capacity, quota?): retrying" ;;
      PREEMPTED|SUSPENDED|SUSPENDING|FAILED|TERMINATED|STOPPED)
        log "TPU state $s: recreating"; delete_tpu
        create_tpu || log "create failed (capacity, quota?): retrying" ;;
      *) log "TPU state $s: waiting" ;;  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, CREATING
    esac
    sleep "$WAIT_SECONDS"
  done
}

# Copies the code (or clones it) and installs the package on every worker. Idempotent.
setup_workers() {
  log "installing lmc_jax on all workers"
  if [[ -n "$REPO_URL" ]]; then
    tpu_ssh all "if [ -d $REMOTE_REPO/.git ]; then git -C $REMOTE_REPO pull --ff-only; \
else git clone $REPO_URL $REMOTE_REPO; fi" || return 1
  else
    local tarball
    tarball="$(mktemp -d)/lmc_jax.tar.gz"
    tar -czf "$tarball" --exclude=.git --exclude=runs --exclude='.venv*' --exclude=venv \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
      --exclude=.ruff_cache . || return 1
    gc compute tpus tpu-vm scp "$tarball" "$TPU_NAME":lmc_jax.tar.gz --zone="$ZONE" \
      --worker=all || return 1
    tpu_ssh all "mkdir -p $REMOTE_REPO && tar -xzf lmc_jax.tar.gz -C $REMOTE_REPO" || return 1
  fi
  tpu_ssh all "set -e; [ -d $REMOTE_VENV ] || python3 -m venv $REMOTE_VENV; \
$REMOTE_VENV/bin/pip install -q --upgrade pip; \
$REMOTE_VENV/bin/pip install -q -e ./$REMOTE_REPO 'jax[tpu]==$JAX_VERSION'" || return 1
  if [[ -n "$GCS_BUCKET" ]]; then
    tpu_ssh all "set -e; command -v gcsfuse >/dev/null || { \
echo 'deb https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -c -s)' main' \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null; \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; \
mkdir -p gcs; mountpoint -q gcs || gcsfuse --implicit-dirs $GCS_BUCKET gcs" || return 1
  fi
}

# Writes ~/lmc_run.sh on every worker: runs the job and leaves its exit status in ~/lmc_run.rc.
write_runner() {
  local workers runner cmd
  workers="$(gc compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
              --format='value(networkEndpoints.len())' 2>/dev/null)" || workers=1
  cmd=(python -m lmc_jax.main)
  if [[ "${workers:-1}" -gt 1 ]]; then  # multi-host: main calls jax.distributed.initialize()
    cmd=(env LMC_JAX_DISTRIBUTED=1 "${cmd[@]}")
    [[ -n "$GCS_BUCKET" ]] || log "warning: $workers workers without GCS_BUCKET: checkpoints" \
      "need a directory that all workers share"
  fi
  local extra=()
  eval "extra=($EXTRA_ARGS)"  # shell words, quotes allowed: '--config.prompt="a red fox"'
  cmd+=("--config=$CONFIG" "--workdir=../$WORKDIR" "${extra[@]}")  # runs in ~/REMOTE_REPO
  runner="$(mktemp)"
  {
    echo '#!/usr/bin/env bash'
    echo "cd ~/$REMOTE_REPO && source ~/$REMOTE_VENV/bin/activate || exit 1"
    echo 'export LMC_JAX_NO_REEXEC=1 TF_CPP_MIN_LOG_LEVEL=2'  # malloc re-exec is for CPU runs
    # After a preemption the old VM is gone: its workdir lock (on gcsfuse, no flock) is stale.
    echo "export LMC_JAX_TAKE_OVER_LOCK=${TAKE_OVER_LOCK:-0}"
    printf '%q ' "${cmd[@]}"
    echo
    echo 'echo $? > ~/lmc_run.rc'
  } > "$runner"
  log "job on $workers worker(s): ${cmd[*]}"
  gc compute tpus tpu-vm scp "$runner" "$TPU_NAME":lmc_run.sh --zone="$ZONE" --worker=all \
    || { rm -f "$runner"; return 1; }
  rm -f "$runner"
}

# Starts ~/lmc_run.sh detached on every worker (it survives the ssh session).
start_job() {
  write_runner || return 1
  tpu_ssh all 'rm -f ~/lmc_run.rc; setsid nohup bash ~/lmc_run.sh > ~/lmc_run.log 2>&1 \
< /dev/null & echo $! > ~/lmc_run.pid'
}

# Copies the outputs of a run with a VM-local workdir to OUT_DIR/RUN_NAME-out.tar.gz.
fetch_outputs() {
  tpu_ssh 0 "tar -czf lmc_out.tar.gz -C \"\$(dirname ~/$WORKDIR)\" $RUN_NAME" &&
    gc compute tpus tpu-vm scp "$TPU_NAME":lmc_out.tar.gz "$OUT_DIR/$RUN_NAME-out.tar.gz" \
      --zone="$ZONE" --worker=0 &&
    log "copied the outputs to $OUT_DIR/$RUN_NAME-out.tar.gz"
}

# Prints the job's exit status on worker 0, RUNNING, or UNREACHABLE.
job_status() {
  local out
  if out="$(tpu_ssh 0 "if [ -f ~/lmc_run.rc ]; then cat ~/lmc_run.rc; \
elif [ -f ~/lmc_run.pid ] && kill -0 \$(cat ~/lmc_run.pid) 2>/dev/null; then echo RUNNING; \
else echo LOST; fi" 2>/dev/null)"; then
    echo "$out" | tail -n 1
  else
    echo UNREACHABLE
  fi
}

# ---- commands --------------------------------------------------------------------------------
case "${1:-run}" in
  status) echo "TPU: $(tpu_state)"; echo "job: $(job_status)"; exit 0 ;;
  logs) tpu_ssh 0 "tail -n 50 ~/lmc_run.log"; exit 0 ;;
  delete) delete_tpu; exit 0 ;;
  run) ;;
  *) echo "usage: $0 [run|status|logs|delete]" >&2; exit 2 ;;
esac

if [[ -z "$PROJECT" ]]; then
  echo "error: no project: set PROJECT=... or run gcloud config set project ..." >&2
  exit 2
fi
if [[ ! -f "${CONFIG%%:*}" ]]; then
  echo "error: config ${CONFIG%%:*} not found; run from the repository root" >&2
  exit 2
fi

launches=0
need_setup=1
while true; do
  ensure_tpu
  if [[ "$need_setup" == 1 ]]; then
    if ! setup_workers; then
      log "setup failed (TPU gone meanwhile?): retrying"; sleep "$WAIT_SECONDS"; continue
    fi
    need_setup=0
  fi
  status="$(job_status)"
  case "$status" in
    RUNNING) log "job already running: watching it" ;;
    UNREACHABLE) log "worker 0 unreachable: retrying"; sleep "$WAIT_SECONDS"; continue ;;
    *)
      if (( launches >= MAX_RELAUNCHES )); then
        log "giving up after $launches launches"; exit 1
      fi
      if ! start_job; then
        log "could not start the job: retrying"; sleep "$WAIT_SECONDS"; continue
      fi
      launches=$((launches + 1)) ;;
  esac
  while true; do
    sleep "$POLL_SECONDS"
    state="$(tpu_state)"
    if [[ "$state" != READY && "$state" != ACTIVE ]]; then
      log "TPU state $state (preempted?): recreating and resuming"
      need_setup=1
      TAKE_OVER_LOCK=1
      break
    fi
    status="$(job_status)"
    case "$status" in
      RUNNING|UNREACHABLE) continue ;;
      0)
        log "job finished; outputs in ~/$WORKDIR${GCS_BUCKET:+ = gs://$GCS_BUCKET/$RUN_NAME}"
        if [[ "$DELETE_WHEN_DONE" == 1 ]]; then
          [[ -n "$GCS_BUCKET" ]] || fetch_outputs || log "could not copy the outputs; TPU kept"
          [[ -n "$GCS_BUCKET" || -f "$OUT_DIR/$RUN_NAME-out.tar.gz" ]] && delete_tpu
        fi
        exit 0 ;;
      143|137)
        log "job stopped by a signal (exit $status, preemption notice?): relaunching"
        TAKE_OVER_LOCK=1
        break ;;
      LOST)
        log "job process gone without an exit status: relaunching"
        TAKE_OVER_LOCK=1
        break ;;
      *)
        log "job failed with exit status $status; last lines of its log:"
        tpu_ssh 0 "tail -n 30 ~/lmc_run.log" || true
        exit 1 ;;
    esac
  done
done
