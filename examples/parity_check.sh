#!/usr/bin/env bash
# Check megatron_qat's MXFP4 against a reference on a checkpoint's routed expert weights.
#   examples/parity_check.sh [CHECKPOINT ...] [-- extra megatron-qat parity flags]
# Without a checkpoint, a tiny HF-style MoE checkpoint (Qwen3-MoE names, with its config.json) is
# generated in a temporary directory that is removed on exit. Nothing is written to the current
# directory; for a JSON report pass one:  examples/parity_check.sh CKPT -- --json /path/report.json
# Exit code: that of megatron-qat parity: 0 all equal, 1 mismatch, 2 usage/environment error,
# 3 incomplete (see docs/parity.md).
set -euo pipefail
PY="${PYTHON:-python}"
paths=()
while [[ $# -gt 0 && "$1" != "--" ]]; do paths+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
tmp=""
trap '[[ -n "$tmp" ]] && rm -rf "$tmp"' EXIT  # runs: the parity check below is a child, not an exec
if [[ ${#paths[@]} -eq 0 ]]; then
  tmp="$(mktemp -d)"
  "$PY" - "$tmp" <<'PYEOF'
import json, sys, torch
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
with open(f"{out}/config.json", "w") as f:
    json.dump({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, f)
print(f"generated {out}/model.safetensors ({len(t)} tensors)", file=sys.stderr)
PYEOF
  paths=("$tmp")
fi
"$PY" -m megatron_qat.parity "${paths[@]}" "$@"
