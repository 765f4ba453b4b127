#!/usr/bin/env bash
# The pure-Python packages benchmarks/gpu_acceptance.py needs beyond the lent GPU image (torch,
# Lightning, transformers and their dependencies, PyYAML among them): omegaconf and rich, which
# the memory planner reads. Installed into .carry/ (git-ignored, ~6 MB) for PYTHONPATH=src:.carry
# and for the device run's `carry`; no compiled code, so any CPython 3.x of the image takes it.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry
python3 -m pip install --quiet --no-compile --no-deps --target .carry \
  "omegaconf==2.3.*" "antlr4-python3-runtime==4.9.*" "rich>=13" "pygments>=2.13" \
  "markdown-it-py>=2.2" "mdurl>=0.1"
du -sh .carry
