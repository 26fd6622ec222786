#!/usr/bin/env bash
# Runs kptjax on every worker of a Cloud TPU VM slice (v5e-8, v5p-64, ...).
#
#   launch/tpu_pod.sh setup NAME ZONE                   # once: clone, venv, pip install '.[tpu,gcs]'
#   launch/tpu_pod.sh train NAME ZONE --config configs/locllm_coco.py --workdir gs://BUCKET/run \
#       --config.mesh.shape.data=1 --config.mesh.shape.fsdp=8
#   launch/tpu_pod.sh stop NAME ZONE                    # ends the train processes it started
#
# Each is one `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command=...`:
# every worker runs the same command, and `python -m kptjax.train --multihost` lets JAX read
# the slice's coordinator, process count and index from the TPU VM metadata. The workdir
# must be a gs:// bucket every worker writes (checkpoint shards from all, logs from process 0).
#
# Environment: KPTJAX_REPO (git URL to clone), KPTJAX_REF (branch or tag, default main),
# KPTJAX_DIR (checkout on the VMs, default kptjax in the home directory), GCLOUD (default
# gcloud); extra gcloud flags (e.g. --project P) in GCLOUD_FLAGS.
set -euo pipefail

usage() { sed -n '2,9p' "$0" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 name=$2 zone=$3
shift 3
dir=${KPTJAX_DIR:-kptjax}
gcloud_bin=${GCLOUD:-gcloud}

case "$action" in
  setup)
    [[ -n "${KPTJAX_REPO:-}" ]] || { echo "setup needs KPTJAX_REPO=<git url>" >&2; exit 2; }
    remote="set -e; [ -d $(printf %q "$dir") ] || git clone --branch $(printf %q "${KPTJAX_REF:-main}") \
$(printf %q "$KPTJAX_REPO") $(printf %q "$dir"); cd $(printf %q "$dir"); python3 -m venv .venv; \
.venv/bin/pip install -q -e '.[tpu,gcs]'"
    ;;
  train)
    [[ $# -gt 0 ]] || usage
    args=$(printf '%q ' "$@")
    remote="cd $(printf %q "$dir") && echo \$\$ > kptjax_train.pid && \
exec .venv/bin/python -m kptjax.train --multihost ${args}"
    ;;
  stop)
    remote="cd $(printf %q "$dir") && [ -f kptjax_train.pid ] && kill \$(cat kptjax_train.pid) || true"
    ;;
  *) usage ;;
esac

# shellcheck disable=SC2086  # GCLOUD_FLAGS is a list of flags
exec "$gcloud_bin" compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all ${GCLOUD_FLAGS:-} \
  --command="$remote"
