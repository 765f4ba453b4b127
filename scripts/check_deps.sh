#!/usr/bin/env bash
# Prove that the kit's dependency sets resolve: pip's resolver, in a throwaway venv, installs
# nothing (--dry-run) and ignores what is installed (--ignore-installed), for
#   cpu: torch==2.13.0 first (what scripts/setup.sh installs) + the kit with [dev]
#   gpu: the kit with [gpu] (vllm 0.33.0 and the torch / transformers it pins)
# and prints the versions it would install. Needs the package index (a few minutes; pip reads
# wheel metadata only). Usage: scripts/check_deps.sh [cpu|gpu]...   (default: both)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d /tmp/osftkit-deps.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
pip=("$scratch/venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
status=0
for set in "${@:-cpu gpu}"; do
  for name in $set; do
    case "$name" in
      cpu) requirements=("torch==2.13.0" "$root[dev]") ;;
      gpu) requirements=("$root[gpu]") ;;
      *) echo "check_deps: unknown set '$name' (cpu or gpu)"; exit 2 ;;
    esac
    report="$scratch/$name.json"
    echo "== $name: pip install --dry-run --ignore-installed ${requirements[*]}"
    if "${pip[@]}" install --quiet --dry-run --ignore-installed --report "$report" \
      "${requirements[@]}" >"$scratch/$name.log" 2>&1; then
      "$scratch/venv/bin/python" - "$report" <<'PY'
import json, sys
installs = json.load(open(sys.argv[1]))["install"]
versions = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
keys = ("osftkit", "torch", "transformers", "lightning", "tokenizers", "vllm", "safetensors")
print("resolved:", ", ".join(f"{k}=={versions[k]}" for k in keys if k in versions))
print(f"({len(versions)} distributions in all)")
PY
    else
      status=1
      tail -n 25 "$scratch/$name.log"
      echo "== $name: does NOT resolve"
    fi
  done
done
exit "$status"
