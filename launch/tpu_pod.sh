#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM pod slice; jax.distributed.initialize()
# finds the other workers itself. The repo must already be installed on each worker
# (`pip install -e .` with jax[tpu]) and the workdir must be a shared path (e.g. gs://...).
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/quickstart.py --workdir=gs://bucket/W
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ~/jaxmed && python3 -m jaxmed.main $args"
