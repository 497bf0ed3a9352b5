#!/usr/bin/env bash
# One host, all of its devices (GPUs, TPU chips or CPU):
#   launch/local.sh --config=configs/quickstart.py --workdir=workdirs/quickstart [--config.k=v]
set -euo pipefail
exec python -m jaxmed.main "$@"
