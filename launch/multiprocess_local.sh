#!/usr/bin/env bash
# N processes on this machine joined through jax.distributed (gloo CPU collectives): the test
# path for multi-host runs. Each process sees D CPU devices and reads its own data shard. The
# interpreter is $PYTHON if set (tests pass their own), else the python3 on PATH (the venv's).
#   launch/multiprocess_local.sh N D --config=configs/quickstart.py --workdir=W [--config.k=v]
set -euo pipefail
n=${1:?number of processes}; d=${2:?devices per process}; shift 2
port=${JAXMED_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$d" \
    "${PYTHON:-python3}" -m jaxmed.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
