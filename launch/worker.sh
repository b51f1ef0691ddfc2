#!/usr/bin/env bash
# Runs on each TPU VM worker; `launch/tpu_vm.sh install` copies it to ~/sptlm-worker.sh there.
# It keeps one `sptlm train` per worker: installs the shipped checkout into a Python 3.11
# virtualenv, starts the job detached from the ssh session (so ssh can return), stops it with
# SIGTERM (sptlm then saves a checkpoint), and reports whether it runs.
#
#   bash sptlm-worker.sh install (--archive FILE.tar.gz | --git-url URL [--git-ref REF]) --jax-version V
#   bash sptlm-worker.sh start [--env KEY=VALUE ...] -- sptlm train --config ... --workdir gs://...
#   bash sptlm-worker.sh stop [--timeout SECONDS]   # SIGTERM, wait for the checkpoint, then SIGKILL
#   bash sptlm-worker.sh status                     # exit 0 while the job runs, 3 when it does not
#   bash sptlm-worker.sh logs [--follow] [--lines N]
set -euo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
HOME_DIR=${SPTLM_WORKER_HOME:-$HOME}
SRC=$HOME_DIR/sptlm                 # the checkout; configs/ are read from here
VENV=$HOME_DIR/sptlm-venv           # outside SRC, so a reinstall keeps it
LOG=$HOME_DIR/sptlm.log             # one log per worker, appended across restarts
PIDFILE=$HOME_DIR/sptlm.pid
EXITFILE=$HOME_DIR/sptlm.exit
TPU_ENV_URL=${SPTLM_TPU_ENV_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes/tpu-env}
HOST=$(hostname)

die() { echo "sptlm-worker ($HOST): $*" >&2; exit 1; }

running() {
  # The pid file survives a reboot (host maintenance): the pid must still be an sptlm process.
  local pid
  [[ -s $PIDFILE ]] || return 1
  pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null || return 1
  [[ ! -d /proc/$pid ]] || tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q sptlm
}

find_uv() {
  local uv=${SPTLM_UV:-}
  if [[ -z $uv ]]; then
    uv=$(command -v uv || true)
    [[ -n $uv ]] || uv=$HOME/.local/bin/uv
    if [[ ! -x $uv ]]; then
      # TPU VM images ship Python 3.10; uv fetches the 3.11 that sptlm pins.
      python3 -m pip install --user -q uv >&2 || curl -LsSf https://astral.sh/uv/install.sh | sh >&2
    fi
  fi
  echo "$uv"
}

cmd_install() {
  local archive="" git_url="" git_ref="" jax_version=""
  while (($#)); do
    case $1 in
      --archive) archive=$2; shift 2 ;;
      --git-url) git_url=$2; shift 2 ;;
      --git-ref) git_ref=$2; shift 2 ;;
      --jax-version) jax_version=$2; shift 2 ;;
      *) die "install: unknown argument $1" ;;
    esac
  done
  [[ -n $archive || -n $git_url ]] || die "install needs --archive FILE or --git-url URL"
  [[ -n $jax_version ]] || die "install needs --jax-version (the jax pinned in pyproject.toml)"
  ! running || die "sptlm is running (pid $(cat "$PIDFILE")); stop it before installing"

  rm -rf "$SRC.new"
  if [[ -n $archive ]]; then
    mkdir -p "$SRC.new"
    tar -xzf "$archive" -C "$SRC.new"
  else
    git clone -q "$git_url" "$SRC.new"
    [[ -z $git_ref ]] || git -C "$SRC.new" checkout -q "$git_ref"
  fi
  rm -rf "$SRC"
  mv "$SRC.new" "$SRC"

  local uv
  uv=$(find_uv)
  [[ -x $VENV/bin/python ]] || "$uv" venv -q --python 3.11 "$VENV"
  "$uv" pip install -q --python "$VENV/bin/python" -e "$SRC" "jax[tpu]==$jax_version"
  "$VENV/bin/sptlm" --help >/dev/null
  echo "sptlm-worker ($HOST): installed $SRC into $VENV (jax[tpu]==$jax_version)"
}

export_tpu_env() {
  # Cloud TPU VMs keep the slice's worker list (and, for multislice, the megascale coordinator)
  # in instance metadata, not in the environment; export them where missing so that sptlm's
  # pod detection sees a multi-host job. GKE sets them in the environment already.
  local text key value
  text=$(curl -sf -m 5 -H 'Metadata-Flavor: Google' "$TPU_ENV_URL" 2>/dev/null) || return 0
  for key in TPU_WORKER_HOSTNAMES MEGASCALE_COORDINATOR_ADDRESS; do
    [[ -z ${!key:-} ]] || continue
    value=$(sed -n "s/^$key: '\(.*\)'\$/\1/p" <<<"$text" | head -n 1)
    [[ -z $value ]] || export "$key=$value"
  done
}

cmd_start() {
  local -a envs=()
  while (($#)); do
    case $1 in
      --env) envs+=("$2"); shift 2 ;;
      --) shift; break ;;
      *) die "start: unknown argument $1 (put the command after --)" ;;
    esac
  done
  (($#)) || die "start needs the command after --, e.g. -- sptlm train --config ..."
  if running; then
    die "sptlm is already running (pid $(cat "$PIDFILE")); run stop first"
  fi
  [[ -d $SRC ]] || die "$SRC is missing; run install first"
  local kv
  for kv in ${envs[@]+"${envs[@]}"}; do
    [[ $kv == *=* ]] || die "--env $kv is not KEY=VALUE"
    export "${kv?}"
  done
  export_tpu_env
  export PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1
  rm -f "$PIDFILE" "$EXITFILE"
  echo "==== $(date -u +%Y-%m-%dT%H:%M:%SZ) $HOST start: $*" >>"$LOG"
  cd "$SRC"
  # A new session, so the job outlives this ssh connection; _supervise records pid and exit code.
  setsid nohup bash "$SELF" _supervise "$@" >>"$LOG" 2>&1 </dev/null &
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -s $PIDFILE ]] && break
    sleep 0.1
  done
  [[ -s $PIDFILE ]] || die "the job did not start; see $LOG"
  echo "sptlm-worker ($HOST): started pid $(cat "$PIDFILE"), log $LOG"
}

cmd_supervise() {
  "$@" &
  local child=$! rc=0
  echo "$child" >"$PIDFILE"
  wait "$child" || rc=$?
  echo "$rc" >"$EXITFILE"
  echo "==== $(date -u +%Y-%m-%dT%H:%M:%SZ) $HOST exit code $rc"
}

cmd_stop() {
  local timeout=600
  while (($#)); do
    case $1 in
      --timeout) timeout=$2; shift 2 ;;
      *) die "stop: unknown argument $1" ;;
    esac
  done
  if ! running; then
    echo "sptlm-worker ($HOST): not running"
    return 0
  fi
  local pid i j
  pid=$(cat "$PIDFILE")
  kill -TERM "$pid"
  echo "sptlm-worker ($HOST): sent SIGTERM to $pid; waiting up to ${timeout}s for its checkpoint"
  for ((i = 0; i < timeout * 10; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      for ((j = 0; j < 50; j++)); do [[ -s $EXITFILE ]] && break; sleep 0.1; done
      echo "sptlm-worker ($HOST): stopped, exit code $(cat "$EXITFILE" 2>/dev/null || echo unknown)"
      return 0
    fi
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  echo "sptlm-worker ($HOST): still running after ${timeout}s; killed it (the last saved checkpoint stands)"
}

cmd_status() {
  if running; then
    echo "sptlm-worker ($HOST): running, pid $(cat "$PIDFILE")"
    return 0
  fi
  echo "sptlm-worker ($HOST): not running; last exit code $(cat "$EXITFILE" 2>/dev/null || echo none)"
  return 3
}

cmd_logs() {
  local lines=100 follow=""
  while (($#)); do
    case $1 in
      --lines) lines=$2; shift 2 ;;
      --follow) follow=1; shift ;;
      *) die "logs: unknown argument $1" ;;
    esac
  done
  [[ -e $LOG ]] || die "no log yet at $LOG"
  if [[ -n $follow ]]; then
    exec tail -n "$lines" -F "$LOG"
  fi
  tail -n "$lines" "$LOG"
}

command=${1:-}
(($#)) && shift
case $command in
  install) cmd_install "$@" ;;
  start) cmd_start "$@" ;;
  _supervise) cmd_supervise "$@" ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status "$@" ;;
  logs) cmd_logs "$@" ;;
  *) die "usage: sptlm-worker.sh install|start|stop|status|logs ... (got '${command}')" ;;
esac
