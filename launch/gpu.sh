#!/usr/bin/env bash
# Run lmc_jax on a single-GPU host, and keep it running through preemptions.
#
# On the GPU host itself (from the repository root):
#   launch/gpu.sh                 # venv + `pip install -e . "jax[cuda12]==0.10.2"`, then run the
#                                 # job in a retry loop until it exits 0
# From a workstation with gcloud, on a Google Cloud spot VM:
#   REPO_URL=https://github.com/you/lmc_jax.git launch/gpu.sh gce
#                                 # creates the VM with this script as its startup script,
#                                 # restarts the VM after each preemption, stops it when the
#                                 # job is done (.lmc_done) or failed (.lmc_failed in WORKDIR)
#   launch/gpu.sh gce-status | gce-logs | gce-delete
#
# Settings (environment variables; defaults below). Resume is automatic: lmc_jax restores the
# last checkpoint from WORKDIR, and on SIGTERM (a spot preemption notice) it saves one and exits
# with status 143. The loop then starts the job again if the host is still up; a spot VM that was
# stopped comes back with `gcloud compute instances start` (gce mode does that) and its startup
# script (this file) resumes the run from the same WORKDIR on the boot disk.
set -euo pipefail

# ---- settings --------------------------------------------------------------------------------
CONFIG="${CONFIG:-configs/t23d.py}"              # plus preset, e.g. configs/t23d.py:tiny
WORKDIR="${WORKDIR:-runs/t23d}"                  # relative to the repository, or absolute
EXTRA_ARGS="${EXTRA_ARGS:-}"                     # shell words: '--config.prompt="a red fox"' ...
VENV="${VENV:-.venv-gpu}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
MAX_RETRIES="${MAX_RETRIES:-20}"
RETRY_SLEEP="${RETRY_SLEEP:-30}"
REQUIRE_GPU="${REQUIRE_GPU:-1}"                  # 0: run on what JAX finds (a CPU) all the same
# JAX on GPU: take 90% of the GPU memory up front (the default is 75%); set
# XLA_PYTHON_CLIENT_PREALLOCATE=false to allocate on demand (slower, shares the GPU).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export LMC_JAX_NO_REEXEC="${LMC_JAX_NO_REEXEC:-1}"  # the malloc re-exec helps CPU compute only

# gce mode (a Google Cloud VM with one GPU)
PROJECT="${PROJECT:-}"                           # default: gcloud config get-value project
ZONE="${ZONE:-us-central1-a}"
VM_NAME="${VM_NAME:-lmc-jax-gpu}"
MACHINE_TYPE="${MACHINE_TYPE:-g2-standard-8}"   # g2 = NVIDIA L4; a2-highgpu-1g = A100 40GB
GPU="${GPU:-nvidia-l4}"                          # for n1 machines: nvidia-tesla-t4, -v100 ...
SPOT="${SPOT:-1}"
IMAGE_FAMILY="${IMAGE_FAMILY:-common-cu124-debian-11-py310}"  # Deep Learning VM with a driver;
IMAGE_PROJECT="${IMAGE_PROJECT:-deeplearning-platform-release}"  # list: gcloud compute images
                                                 # list --project=deeplearning-platform-release
DISK_GB="${DISK_GB:-200}"
REPO_URL="${REPO_URL:-}"
REMOTE_DIR="${REMOTE_DIR:-/opt/lmc_jax}"         # where the startup script clones REPO_URL
POLL_SECONDS="${POLL_SECONDS:-120}"
DELETE_WHEN_DONE="${DELETE_WHEN_DONE:-0}"        # 0: keep the (stopped) VM and its outputs
REMOTE_LOG="${REMOTE_LOG:-/var/log/lmc_jax.log}" # the job's output on the VM (gce-logs shows it)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- on the GPU host -------------------------------------------------------------------------
install() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import lmc_jax, jax; assert jax.__version__ == '$JAX_VERSION'" \
      2>/dev/null; then
    log "installing lmc_jax and jax[cuda12]==$JAX_VERSION"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e . "jax[cuda12]==$JAX_VERSION"
  fi
  if ! "$VENV/bin/python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
    if [[ "$REQUIRE_GPU" != 0 ]]; then
      echo "error: JAX sees no GPU (nvidia-smi: $(nvidia-smi -L 2>&1 | head -n 1)); check the" \
        "NVIDIA driver (>= 525 for CUDA 12), or set REQUIRE_GPU=0 to run on the CPU" >&2
      exit 1
    fi
    log "no GPU: running on $("$VENV/bin/python" -c "import jax; print(jax.default_backend())")" \
      "(REQUIRE_GPU=0)"
  fi
}

run_host() {
  cd "$(dirname "$0")/.."
  if [[ ! -f "${CONFIG%%:*}" ]]; then
    echo "error: config ${CONFIG%%:*} not found in $(pwd)" >&2
    exit 2
  fi
  install
  local extra=() attempt=0 rc
  eval "extra=($EXTRA_ARGS)"
  mkdir -p "$WORKDIR"
  rm -f "$WORKDIR/.lmc_failed"
  while true; do
    attempt=$((attempt + 1))
    log "run $attempt: $CONFIG -> $WORKDIR"
    set +e
    "$VENV/bin/python" -m lmc_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${extra[@]}"
    rc=$?
    set -e
    case "$rc" in
      0) log "done; outputs in $WORKDIR"; touch "$WORKDIR/.lmc_done"; return 0 ;;
      2) log "bad input (exit 2): not retrying"; echo 2 > "$WORKDIR/.lmc_failed"; return 2 ;;
      143|137) log "stopped by a signal (exit $rc; preemption?)" ;;
      *) log "failed with exit status $rc" ;;
    esac
    if (( attempt > MAX_RETRIES )); then
      log "giving up after $attempt runs"; echo "$rc" > "$WORKDIR/.lmc_failed"; return "$rc"
    fi
    sleep "$RETRY_SLEEP"  # a preempted host is usually gone before this ends
  done
}

# ---- gce mode: a spot VM whose startup script is this file -----------------------------------
gc() { gcloud --quiet --project="$PROJECT" "$@"; }

need_gcloud() {  # gcloud on PATH and a project, or one error line
  if ! command -v gcloud >/dev/null; then
    echo "error: gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)" \
      "and run gcloud auth login" >&2
    exit 2
  fi
  PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
  if [[ -z "$PROJECT" ]]; then
    echo "error: no project: set PROJECT=... or run gcloud config set project ..." >&2
    exit 2
  fi
}

vm_status() {  # RUNNING, TERMINATED (stopped or preempted), STOPPING, ... or NOT_FOUND
  gc compute instances describe "$VM_NAME" --zone="$ZONE" --format='value(status)' 2>/dev/null \
    || echo NOT_FOUND
}

vm_ssh() { gc compute ssh "$VM_NAME" --zone="$ZONE" --command="$1"; }

startup_script() {  # this file, with the settings fixed, running host mode from REMOTE_DIR
  printf '#!/usr/bin/env bash\n'
  printf 'export %s=%q\n' CONFIG "$CONFIG" WORKDIR "$WORKDIR" EXTRA_ARGS "$EXTRA_ARGS" \
    JAX_VERSION "$JAX_VERSION" MAX_RETRIES "$MAX_RETRIES"
  printf 'if [ ! -d %q ]; then git clone %q %q || exit 1; fi\n' \
    "$REMOTE_DIR" "$REPO_URL" "$REMOTE_DIR"
  printf 'cd %q && exec bash launch/gpu.sh host >> %q 2>&1\n' "$REMOTE_DIR" "$REMOTE_LOG"
}

create_vm() {
  local spot=() script
  [[ "$SPOT" == 1 ]] && spot=(--provisioning-model=SPOT --instance-termination-action=STOP)
  script="$(mktemp)"
  startup_script > "$script"
  log "creating $VM_NAME ($MACHINE_TYPE, $GPU, spot=$SPOT) in $ZONE"
  gc compute instances create "$VM_NAME" --zone="$ZONE" --machine-type="$MACHINE_TYPE" \
    --accelerator="type=$GPU,count=1" --maintenance-policy=TERMINATE "${spot[@]}" \
    --image-family="$IMAGE_FAMILY" --image-project="$IMAGE_PROJECT" \
    --boot-disk-size="${DISK_GB}GB" --metadata=install-nvidia-driver=True \
    --metadata-from-file=startup-script="$script" || { rm -f "$script"; return 1; }
  rm -f "$script"
}

workdir_on_vm() {
  case "$WORKDIR" in /*) echo "$WORKDIR" ;; *) echo "$REMOTE_DIR/$WORKDIR" ;; esac
}

run_gce() {
  if [[ -z "$REPO_URL" ]]; then
    echo "error: gce mode clones the code on the VM: set REPO_URL (a git URL it can reach)" >&2
    exit 2
  fi
  need_gcloud
  local status job wd
  wd="$(printf %q "$(workdir_on_vm)")"
  while true; do
    status="$(vm_status)"
    case "$status" in
      NOT_FOUND) create_vm || log "create failed (capacity, quota?): retrying" ;;
      TERMINATED|STOPPED|SUSPENDED)
        log "VM $status (preempted?): starting it again; the run resumes from its workdir"
        gc compute instances start "$VM_NAME" --zone="$ZONE" || log "start failed: retrying" ;;
      RUNNING)  # the job's state: host mode leaves .lmc_done or .lmc_failed in its workdir
        job="$(vm_ssh "if sudo test -f $wd/.lmc_done; then echo DONE; \
elif sudo test -f $wd/.lmc_failed; then echo FAILED; else echo RUNNING; fi" 2>/dev/null)" \
          || job=UNREACHABLE
        case "$job" in
          *DONE)
            log "job finished; outputs in $VM_NAME:$(workdir_on_vm)"
            if [[ "$DELETE_WHEN_DONE" == 1 ]]; then
              gc compute instances delete "$VM_NAME" --zone="$ZONE"
            else
              gc compute instances stop "$VM_NAME" --zone="$ZONE"
            fi
            return 0 ;;
          *FAILED)
            log "job failed; last lines of its log ($REMOTE_LOG on the VM):"
            vm_ssh "sudo tail -n 30 $(printf %q "$REMOTE_LOG")" || true
            log "stopping $VM_NAME (its disk keeps the workdir)"
            gc compute instances stop "$VM_NAME" --zone="$ZONE"
            return 1 ;;
        esac ;;
      *) log "VM $status: waiting" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

case "${1:-host}" in
  host) run_host ;;
  gce) run_gce ;;
  gce-status) need_gcloud; echo "VM: $(vm_status)" ;;
  gce-logs) need_gcloud; vm_ssh "sudo tail -n 50 $(printf %q "$REMOTE_LOG")" ;;
  gce-delete) need_gcloud; gc compute instances delete "$VM_NAME" --zone="$ZONE" ;;
  *) echo "usage: $0 [host|gce|gce-status|gce-logs|gce-delete]" >&2; exit 2 ;;
esac
