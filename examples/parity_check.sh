#!/usr/bin/env bash
# Check megatron_qat's MXFP4 against a reference on a checkpoint's routed expert weights.
#   examples/parity_check.sh [CHECKPOINT ...] [-- extra flags]
# Without a checkpoint, a tiny HF-style MoE checkpoint is generated in a temporary directory.
# Exit code: 0 all equal, 1 mismatch, 2 usage/environment error (see docs/parity.md).
set -euo pipefail
PY="${PYTHON:-python}"
paths=()
while [[ $# -gt 0 && "$1" != "--" ]]; do paths+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
if [[ ${#paths[@]} -eq 0 ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" - "$tmp" <<'PYEOF'
import sys, torch
from safetensors.torch import save_file
out = sys.argv[1]
g = torch.Generator().manual_seed(0)
t = {}
for layer in range(2):
    for e in range(4):
        for proj, shape in (("gate", (64, 128)), ("up", (64, 128)), ("down", (128, 64))):
            t[f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"] = (torch.randn(*shape, generator=g) * 0.02).bfloat16()
    t[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(4, 128, generator=g).bfloat16()  # router: not checked
save_file(t, f"{out}/model.safetensors")
print(f"generated {out}/model.safetensors ({len(t)} tensors)", file=sys.stderr)
PYEOF
  paths=("$tmp")
fi
exec "$PY" -m megatron_qat.parity "${paths[@]}" --json parity_report.json "$@"
