#!/usr/bin/env bash
# Submit an rlhf_ray config to a running Ray cluster as a Ray job.
#
#   cluster/submit.sh [--no-wait] configs/X.yaml [section.field=value ...]
#
# Runs, from the project root:
#   ray job submit --address "$ADDRESS" --submission-id "$ID" --working-dir . \
#       --runtime-env cluster/runtime_env.yaml -- python launch.py --config configs/X.yaml [overrides]
#
# The project directory (minus the `excludes` of cluster/runtime_env.yaml) is uploaded, so the
# config file must live inside the project. Overrides are passed to launch.py unchanged.
#
# Environment:
#   RAY_ADDRESS      the cluster's job API (dashboard) address; default http://127.0.0.1:8265.
#                    RAY_API_SERVER_ADDRESS, when set, wins (as in the Ray CLI itself). A remote
#                    cluster's 8265 port should be reached through an SSH tunnel
#                    (`ray dashboard cluster/ray-up.yaml`, `kubectl port-forward`), never exposed.
#   RAY_AUTH_MODE    must be the same as the cluster's (`disabled` or `token`), for this and every
#                    other Ray command of the session (ray start/status/job ...). With `token`, the
#                    token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
#                    Left unset, Ray 2.60 switches to token auth by itself when ~/.ray/auth_token
#                    exists, so a mismatch shows up as an AuthenticationError.
#   SUBMISSION_ID    job id to use; default rlhf-<config name>-<UTC time>-<random>.
#   PYTHON           interpreter for the local config check (default: python3).
#   SKIP_CONFIG_CHECK=1  do not validate the config locally before uploading.
#
# Stopping: `ray job stop <id>` sends SIGTERM to launch.py, waits RAY_JOB_STOP_WAIT_TIME_S seconds
# (Ray's default is 3; cluster/runtime_env.yaml sets 30) and then sends SIGKILL. The value is read
# by the job supervisor from the job's runtime env, so change it in cluster/runtime_env.yaml.
# Ctrl-C while this script streams logs only stops the streaming; the job keeps running.
set -euo pipefail

usage() {
  echo "usage: $0 [--no-wait] CONFIG.yaml [section.field=value ...]" >&2
  echo "  e.g. $0 configs/toy_ppo.yaml trainer.total_steps=5" >&2
}

no_wait=()
config=""
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-wait) no_wait=(--no-wait); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "unknown option: $1" >&2; usage; exit 2 ;;
    *)
      if [[ -z "$config" ]]; then config="$1"; else overrides+=("$1"); fi
      shift ;;
  esac
done
if [[ -z "$config" && $# -gt 0 ]]; then config="$1"; shift; fi
overrides+=("$@")

if [[ -z "$config" ]]; then
  echo "error: no config given." >&2
  usage
  exit 2
fi
if [[ ! -f "$config" ]]; then
  echo "error: config file '$config' does not exist." >&2
  exit 2
fi

# Work from the project root so that `--working-dir .` uploads the project; the config path
# given to launch.py must be relative to it (that is where the job runs).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
config_abs="$(cd "$(dirname "$config")" && pwd -P)/$(basename "$config")"
case "$config_abs" in
  "$root"/*) config_rel="${config_abs#"$root"/}" ;;
  *) echo "error: $config is outside the project ($root); only files inside it are uploaded." >&2; exit 2 ;;
esac
cd "$root"

# Fail in a second rather than after the upload: launch.py --print-config validates the config
# and the overrides with the same code the job runs (needs pydantic + pyyaml locally).
py="${PYTHON:-python3}"
if [[ "${SKIP_CONFIG_CHECK:-0}" != 1 ]]; then
  if "$py" -c "import pydantic, yaml" 2>/dev/null; then
    "$py" launch.py --config "$config_rel" --print-config "${overrides[@]}" >/dev/null
  else
    echo "note: $py lacks pydantic/pyyaml; config not checked locally (set PYTHON or SKIP_CONFIG_CHECK=1)." >&2
  fi
fi

address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"

# Ray's job API has no authentication by default: anyone who reaches it runs code on the cluster.
# Refuse a non-loopback address over plain HTTP unless Ray token auth is on (RAY_AUTH_MODE=token)
# or ALLOW_INSECURE_RAY=1 says the network path is trusted (an SSH tunnel ends on 127.0.0.1 anyway).
host="$(printf '%s' "$address" | sed -E 's#^[a-z]+://##; s#[:/].*$##')"
case "$address" in
  http://*|ray://*)
    case "$host" in
      127.*|localhost|::1|"[::1]") ;;
      *)
        if [[ "${RAY_AUTH_MODE:-}" != token && "${ALLOW_INSECURE_RAY:-0}" != 1 ]]; then
          echo "error: refusing to submit to $address over plain HTTP without Ray token auth: Ray's job API" >&2
          echo "  has no authentication by default. Use an SSH tunnel to 127.0.0.1, set RAY_AUTH_MODE=token" >&2
          echo "  (with the cluster's token), or set ALLOW_INSECURE_RAY=1 if this network is trusted." >&2
          exit 2
        fi ;;
    esac ;;
esac
name="$(basename "$config_rel" .yaml)"
name="${name//[^A-Za-z0-9_-]/-}"
submission_id="${SUBMISSION_ID:-rlhf-${name}-$(date -u +%Y%m%d-%H%M%S)-$RANDOM}"

echo "submitting $config_rel to $address as job $submission_id (RAY_AUTH_MODE=${RAY_AUTH_MODE:-<unset>})" >&2
status=0
ray job submit \
  --address "$address" \
  --submission-id "$submission_id" \
  --working-dir . \
  --runtime-env cluster/runtime_env.yaml \
  "${no_wait[@]}" \
  -- python launch.py --config "$config_rel" "${overrides[@]}" || status=$?

echo "job id: $submission_id"
if [[ ${#no_wait[@]} -gt 0 && $status -eq 0 ]]; then
  echo "  ray job status --address $address $submission_id"
  echo "  ray job logs --address $address --follow $submission_id"
  echo "  ray job stop --address $address $submission_id"
fi
exit "$status"
