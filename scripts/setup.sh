#!/usr/bin/env bash
# Create .venv if missing and install torch (CPU wheel, pinned first so no CUDA build is pulled) and the kit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.osftkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "osftkit: installing torch==2.13.0 (CPU) and the kit into .venv (log: .venv/install.log)"
  # --no-compile: pip would byte-compile every file of every package (a third of the install);
  # the import below compiles only the modules the kit loads, even where PYTHONDONTWRITEBYTECODE is set.
  {
    .venv/bin/python -m pip install --upgrade pip &&
      .venv/bin/python -m pip install --no-compile "torch==2.13.0" &&
      .venv/bin/python -m pip install --no-compile -e ".[dev]" &&
      env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -c "import osftkit.train, osftkit.evaluate"
  } >.venv/install.log 2>&1 || { tail -n 30 .venv/install.log; echo "osftkit: install failed (see .venv/install.log)"; exit 1; }
  touch "$stamp"
fi
