#!/usr/bin/env bash
# The GPU check (issue 15), one command that fits in 8 minutes: writes ${OUT:-gpu_check_out}/gpu_check.json and prints
# a summary table (benchmarks/gpu_check/__init__.py says what each part measures).
#
#   make gpu-wheels                        # once, on a machine with network: fills .gpu_wheels/
#   bash benchmarks/gpu_check.sh           # on the GPU machine (carry .gpu_wheels there)
#   bash benchmarks/gpu_check.sh --dry-run # every part that can, on CPU (tests/test_gpu_check.py)
#
# Environment: the GPU machine has torch but no megatron-core (and maybe no braceexpand/psutil): each one that does
# not import is installed with `pip install --no-index --no-deps --target .gpu_site` from the wheels in
# ${M2_WHEELS:-.gpu_wheels}; the checkout goes on PYTHONPATH instead of being installed. PYTHON picks the interpreter.
# Any other argument goes to python -m benchmarks.gpu_check (--parts, --budget-s, --data-dir).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export M2_WHEELS=${M2_WHEELS:-$ROOT/.gpu_wheels}
SITE=${M2_SITE:-$ROOT/.gpu_site}
OUT_DIR=${OUT:-$ROOT/gpu_check_out}
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# module -> wheel name prefix; find_spec looks without importing torch
missing=$("$PYTHON" - <<'EOF'
import importlib.util
wanted = {"megatron.core": "megatron_core", "braceexpand": "braceexpand", "psutil": "psutil"}
def found(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
print(" ".join(wheel for module, wheel in wanted.items() if not found(module)))
EOF
)
if [[ -n $missing ]]; then
  wheels=()
  for name in $missing; do
    wheel=$(ls "$M2_WHEELS/$name"-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z $wheel ]]; then
      echo "error: $name is not installed and no $name wheel is in $M2_WHEELS (run make gpu-wheels and carry it)" >&2
      exit 2
    fi
    wheels+=("$wheel")
  done
  echo "installing into $SITE: ${wheels[*]##*/}"
  mkdir -p "$SITE"
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"; then
    # no pip: a wheel is a zip archive of what goes into site-packages
    for wheel in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$wheel" "$SITE"; done
  fi
fi

mkdir -p "$OUT_DIR"
exec "$PYTHON" -m benchmarks.gpu_check --output "$OUT_DIR/gpu_check.json" "$@"
