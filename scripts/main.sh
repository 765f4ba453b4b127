#!/usr/bin/env bash
# The main job: set up .venv if needed, then Online SFT of the offline tiny base (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train.py "$@"
