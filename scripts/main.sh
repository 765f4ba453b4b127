#!/usr/bin/env bash
# The main job: set up .venv if needed, then Online SFT of the offline tiny base (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two CPU processes of one thread each when no GPU is visible: the 2-core machine, both cores.
exec .venv/bin/python train.py ++hardware.cpu_processes=2 "$@"
