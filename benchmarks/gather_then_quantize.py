"""The baseline the export replaces: gather BF16 shards, then quantize (gather-then-quantize).

Benchmark and test code, not part of the package: same walk, groups, merges and output as
:func:`megatron_qat.export.export_mxfp4` (through its public pieces), but the BF16 master weights
travel (16 bits per element instead of 4 + 8/32) and the full layer is quantized on the receiving
ranks. Used by benchmarks/bench_export.py and the bit-identity test
(tests/test_export_distributed.py: both paths must give the same bytes); not for production syncs.
"""

from __future__ import annotations

from typing import Iterator

import torch

from megatron_qat.export.codec import quantize_experts
from megatron_qat.export.formats import LayerBytes, check_format, emit_layer
from megatron_qat.export.gather import ExpertGroups, gather_experts, locate
from megatron_qat.export.live import find_expert_modules, groups_for, raw_biases, raw_weights, training_numerics


def gather_then_quantize(
    model, fmt: str = "raw", *, family: str | None = None, groups: ExpertGroups | None = None,
    dst: int | None = None, block_size: int | None = None, rule=None, impl: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Gather-then-quantize twin of :func:`~megatron_qat.export.export_mxfp4` (same arguments)."""
    check_format(fmt, family)
    trained_block_size, trained_recipe = training_numerics()
    block_size = trained_block_size if block_size is None else block_size
    rule = trained_recipe.weights if rule is None else rule
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for item in find_expert_modules(chunks):
        g = groups_for(item.module, groups)
        where = locate(dst, g)
        glu = bool(item.module.config.gated_linear_unit)
        out = {}
        for role, kind in (("fc1", "column"), ("fc2", "row")):
            linear = getattr(item.module, f"linear_{role}")
            weights = raw_weights(linear)
            full = gather_experts(torch.stack(weights), kind, g, where, glu=glu and role == "fc1")
            bias = raw_biases(linear, len(weights))
            bias_kind = "column" if role == "fc1" else "replicated"
            out[f"{role}_bias"] = None if bias is None else gather_experts(bias, bias_kind, g, where, glu=glu and role == "fc1")
            if full is None:
                out[role] = None
                continue
            names = [f"{item.name}.linear_{role}.weight{e}" for e in range(full.shape[0])]
            out[role] = quantize_experts(list(full.unbind(0)), names, block_size, rule=rule, impl=impl)
        if out["fc1"] is not None:
            yield from emit_layer(LayerBytes(item.layer, glu, **out), fmt, family)
