"""Live-model export on one process: real megatron-core 0.16.1 ``TEGroupedMLP`` / ``TransformerConfig``
with a CPU STAND-IN for Transformer Engine's grouped linear (tests/te_standin.py, extended below
with megatron-core's TEGroupedLinear constructor: the expert-TP division of fc1 rows / fc2 columns).

Transformer Engine cannot be installed here, so ``megatron.core.extensions.transformer_engine
.TEGroupedLinear`` is replaced by :class:`MegatronGroupedLinear` for the test. The helpers of this
module are also used by tests/test_export_distributed.py (the multi-process gloo tests).
"""

from __future__ import annotations

import pytest
import torch

from _helpers import require
from te_standin import StandInGroupedLinear

H, I = 64, 64  # hidden, moe_ffn_hidden_size (I/ETP must stay a multiple of 32 for ETP=2)


def _size(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


class MegatronGroupedLinear(StandInGroupedLinear):
    """megatron-core 0.16.1 ``TEGroupedLinear.__init__`` semantics on the stand-in: with expert-TP
    (``pg_collection.expt_tp``) > 1 or EP > 1, column mode divides ``output_size`` and row mode
    ``input_size`` by the expert-TP size (explicit_expert_comm); ``bias=True`` adds ``bias0..N-1``."""

    parallel_mode: str = ""

    def __init__(self, num_gemms, input_size, output_size, *, config, init_method=None, bias=False,
                 skip_bias_add=False, is_expert=False, tp_comm_buffer_name=None, pg_collection=None):
        etp = _size(pg_collection.expt_tp) if pg_collection is not None else 1
        if self.parallel_mode == "column":
            output_size //= etp
        elif self.parallel_mode == "row":
            input_size //= etp
        super().__init__(num_gemms, input_size, output_size, dtype=config.params_dtype)
        self.config = config
        if bias:
            for i in range(num_gemms):
                self.register_parameter(f"bias{i}", torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)))


class ColumnGroupedLinear(MegatronGroupedLinear):
    parallel_mode = "column"


class RowGroupedLinear(MegatronGroupedLinear):
    parallel_mode = "row"


def install_standin():
    """Make the stand-in megatron's TEGroupedLinear (returns the extension module)."""
    import megatron.core.extensions.transformer_engine as ext

    ext.TEGroupedLinear = MegatronGroupedLinear
    return ext


def make_config(*, experts=4, ep=1, etp=1, glu=True, bias=False, ffn=I):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=1, num_moe_experts=experts, moe_ffn_hidden_size=ffn,
        gated_linear_unit=glu, add_bias_linear=bias, bias_dropout_fusion=False, moe_grouped_gemm=True,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, params_dtype=torch.bfloat16, bf16=True,
        activation_func=torch.nn.functional.silu,
    )


def global_weights(layer: int, experts: int, glu: bool, ffn: int = I, bias: bool = False):
    """Deterministic full-model weights of one layer: fc1 ``[E, (2)I, H]`` rows ``[gate; up]``,
    fc2 ``[E, H, I]`` (BF16), biases ``[E, (2)I]`` / ``[E, H]``; rows get different magnitudes so
    scale bytes vary."""
    gen = torch.Generator().manual_seed(1000 + layer)
    rows1 = (2 if glu else 1) * ffn
    mag1 = torch.logspace(-6, 3, rows1, base=2).reshape(1, rows1, 1)
    mag2 = torch.logspace(-4, 2, H, base=2).reshape(1, H, 1)
    w = {
        "fc1": (torch.randn(experts, rows1, H, generator=gen) * mag1).to(torch.bfloat16),
        "fc2": (torch.randn(experts, H, ffn, generator=gen) * mag2).to(torch.bfloat16),
    }
    if bias:
        w["fc1_bias"] = torch.randn(experts, rows1, generator=gen).to(torch.bfloat16)
        w["fc2_bias"] = torch.randn(experts, H, generator=gen).to(torch.bfloat16)
    return w


def local_shard(w: dict, *, ep_rank: int, ep: int, etp_rank: int, etp: int, glu: bool) -> dict:
    """What Megatron holds on (ep_rank, etp_rank): experts ``ep_rank*N ..``, fc1 rows
    ``[gate_shard; up_shard]``, fc2 columns ``K/ETP``."""
    e = w["fc1"].shape[0]
    n = e // ep
    sl = slice(ep_rank * n, (ep_rank + 1) * n)

    def col(t):
        t = t[sl]
        if glu:
            gate, up = t.chunk(2, dim=1)
            return torch.cat([gate.chunk(etp, dim=1)[etp_rank], up.chunk(etp, dim=1)[etp_rank]], dim=1)
        return t.chunk(etp, dim=1)[etp_rank]

    out = {"fc1": col(w["fc1"]), "fc2": w["fc2"][sl].chunk(etp, dim=-1)[etp_rank]}
    if "fc1_bias" in w:
        out["fc1_bias"] = col(w["fc1_bias"].unsqueeze(-1)).squeeze(-1)
        out["fc2_bias"] = w["fc2_bias"][sl]
    return out


class LayerStub(torch.nn.Module):
    """Stands in for megatron-core's TransformerLayer: ``layer_number`` (1-based, global) and
    ``mlp.experts`` (a real TEGroupedMLP)."""

    def __init__(self, layer_number: int, experts: torch.nn.Module):
        super().__init__()
        self.layer_number = layer_number
        self.mlp = torch.nn.Module()
        self.mlp.experts = experts


def build_chunk(layer_numbers, config, pg, shards_of):
    """A model chunk ``decoder.layers.k`` with real TEGroupedMLPs; ``shards_of(layer_index)`` gives
    the local weights to load (see :func:`local_shard`)."""
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    chunk = torch.nn.Module()
    chunk.decoder = torch.nn.Module()
    layers = []
    for number in layer_numbers:
        n_local = config.num_moe_experts // config.expert_model_parallel_size
        experts = TEGroupedMLP(n_local, config, MLPSubmodules(linear_fc1=ColumnGroupedLinear, linear_fc2=RowGroupedLinear), pg_collection=pg)
        shard = shards_of(number - 1)
        with torch.no_grad():
            for role in ("fc1", "fc2"):
                lin = getattr(experts, f"linear_{role}")
                for i in range(n_local):
                    getattr(lin, f"weight{i}").copy_(shard[role][i])
                    if f"{role}_bias" in shard:
                        getattr(lin, f"bias{i}").copy_(shard[f"{role}_bias"][i])
        layers.append(LayerStub(number, experts))
    chunk.decoder.layers = torch.nn.ModuleList(layers)
    return chunk


def pg_collection(etp_group=None, ep_group=None):
    from megatron.core.process_groups_config import ProcessGroupCollection

    pg = ProcessGroupCollection()
    pg.expt_tp = etp_group
    pg.ep = ep_group
    return pg


def reference_layer(w: dict, layer: int, glu: bool):
    """Gather-then-quantize reference: quantize the FULL layer weights, Megatron layout."""
    from megatron_qat.export.formats import LayerBytes
    from megatron_qat.mxfp4 import FLASHINFER_MXFP4, MXPayload

    fc1, fc2 = (MXPayload.quantize(w[role], 32, rule=FLASHINFER_MXFP4, impl="reference") for role in ("fc1", "fc2"))
    return LayerBytes(layer, glu, fc1, fc2, w.get("fc1_bias"), w.get("fc2_bias"))


def assert_same_pairs(got: dict, want: dict):
    assert list(got) == list(want), f"names differ: {sorted(set(got) ^ set(want))[:6]}"
    for name in want:
        g, r = got[name], want[name]
        assert g.dtype == r.dtype and g.shape == r.shape, (name, g.dtype, r.dtype, g.shape, r.shape)
        iv = torch.uint8 if g.dtype == torch.uint8 else torch.int16
        assert torch.equal(g.contiguous().view(iv), r.contiguous().view(iv)), name


# ----------------------------------------------------------------------------- single-process tests


@pytest.fixture
def megatron_standin(monkeypatch):
    require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
    import megatron.core.extensions.transformer_engine as ext

    monkeypatch.setattr(ext, "TEGroupedLinear", MegatronGroupedLinear)
    return ext


@pytest.mark.parametrize("fmt,family", [("raw", None), ("gpt-oss", None), ("compressed-tensors", "qwen3_moe")])
def test_single_rank_export_equals_quantized_full_weights(megatron_standin, fmt, family):
    """EP = ETP = 1: every format's pairs equal the formatted quantization of the weights."""
    from megatron_qat.export import ExpertGroups, emit_layer, export_mxfp4

    config = make_config(bias=fmt == "gpt-oss")
    ws = {k: global_weights(k, 4, True, bias=fmt == "gpt-oss") for k in (4, 5)}
    chunk = build_chunk([5, 6], config, pg_collection(), lambda k: ws[k])
    got = dict(export_mxfp4([chunk], fmt, family=family, groups=ExpertGroups()))
    want = {}
    for k in (4, 5):
        want.update(emit_layer(reference_layer(ws[k], k, True), fmt, family))
    assert_same_pairs(got, want)
    if fmt == "gpt-oss":
        assert got["model.layers.4.mlp.experts.gate_up_proj_blocks"].shape == (4, 2 * I, H // 32, 16)
        assert got["model.layers.4.mlp.experts.gate_up_proj_scales"].shape == (4, 2 * I, H // 32)
        assert got["model.layers.5.mlp.experts.down_proj_blocks"].shape == (4, H, I // 32, 16)
        assert got["model.layers.5.mlp.experts.gate_up_proj_bias"].shape == (4, 2 * I)
    if fmt == "compressed-tensors":
        assert got["model.layers.4.mlp.experts.3.gate_proj.weight_packed"].shape == (I, H // 2)
        assert got["model.layers.4.mlp.experts.3.down_proj.weight_scale"].shape == (H, I // 32)


def test_gpt_oss_rows_interleaved_even_gate_odd_up(megatron_standin):
    """gpt-oss gate_up rows: even = gate (Megatron fc1 first half), odd = up (second half)."""
    from megatron_qat import mxfp4
    from megatron_qat.export import ExpertGroups, export_mxfp4

    w = global_weights(0, 4, True)
    chunk = build_chunk([1], make_config(), pg_collection(), lambda k: w)
    got = dict(export_mxfp4(chunk, "gpt-oss", groups=ExpertGroups()))
    blocks = got["model.layers.0.mlp.experts.gate_up_proj_blocks"].reshape(4, 2 * I, H // 2)
    scales = got["model.layers.0.mlp.experts.gate_up_proj_scales"]
    gate_c, gate_s = mxfp4.quantize(w["fc1"][:, :I], 32)
    up_c, up_s = mxfp4.quantize(w["fc1"][:, I:], 32)
    assert torch.equal(blocks[:, 0::2], gate_c) and torch.equal(blocks[:, 1::2], up_c)
    assert torch.equal(scales[:, 0::2], gate_s) and torch.equal(scales[:, 1::2], up_s)


def test_export_decodes_to_what_the_patched_forward_uses(megatron_standin):
    """CPU analogue of the GPU check 3b: with the fake-QAT patch on, the weights the forward gets
    from ``_get_weight_tensors`` equal the decoded export, bit for bit (int16 views)."""
    import megatron_qat.megatron as mm
    from megatron_qat import mxfp4
    from megatron_qat.export import ExpertGroups, export_mxfp4

    w = global_weights(0, 4, True)
    chunk = build_chunk([1], make_config(), pg_collection(), lambda k: w)
    got = dict(export_mxfp4(chunk, "raw", groups=ExpertGroups()))
    experts = chunk.decoder.layers[0].mlp.experts
    mm.disable()
    mm.enable(block_size=32)
    try:
        for role in ("fc1", "fc2"):
            used = getattr(experts, f"linear_{role}")._get_weight_tensors()
            for e, u in enumerate(used):
                name = f"decoder.layers.0.mlp.experts.linear_{role}.weight{e}"
                dec = mxfp4.dequantize(got[name + ".mxfp4_codes"], got[name + ".mxfp4_scales"], torch.bfloat16)
                assert torch.equal(dec.view(torch.int16), u.detach().view(torch.int16)), name
    finally:
        mm.disable()


def test_refuses_nonfinite_weight_naming_tensor_and_row(megatron_standin):
    from megatron_qat.export import ExpertGroups, ExportError, export_mxfp4

    w = global_weights(0, 4, True)
    w["fc2"][2, 7, 5] = float("nan")
    chunk = build_chunk([1], make_config(), pg_collection(), lambda k: w)
    with pytest.raises(ExportError, match=r"decoder\.layers\.0\.mlp\.experts\.linear_fc2\.weight2: non-finite .* row 7"):
        list(export_mxfp4(chunk, "raw", groups=ExpertGroups()))


def test_refuses_models_without_grouped_experts_and_bad_formats(megatron_standin):
    from megatron_qat.export import ExpertGroups, ExportError, export_mxfp4

    with pytest.raises(ExportError, match="no routed-expert TEGroupedMLP"):
        list(export_mxfp4(torch.nn.Linear(4, 4), "raw", groups=ExpertGroups()))
    seq = torch.nn.Module()
    seq.local_experts = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(ExportError, match="SequentialMLP"):
        list(export_mxfp4(seq, "raw", groups=ExpertGroups()))
    chunk = build_chunk([1], make_config(), pg_collection(), lambda k: global_weights(0, 4, True))
    with pytest.raises(ExportError, match="accepted formats"):
        list(export_mxfp4(chunk, "nvfp4"))
    with pytest.raises(ExportError, match="compressed-tensors needs the checkpoint family"):
        list(export_mxfp4(chunk, "compressed-tensors"))
    nonglu = build_chunk([1], make_config(glu=False), pg_collection(), lambda k: global_weights(0, 4, False))
    with pytest.raises(ExportError, match="gated MLP"):
        list(export_mxfp4(nonglu, "gpt-oss", groups=ExpertGroups()))


def test_block_size_is_the_training_one_and_travels_with_the_bytes(megatron_standin, monkeypatch):
    """No block size of its own: ``OPEN_TRAINING_MXFP4_BLOCK_SIZE`` (what the forward uses) decides,
    the raw stream carries it in its scale shapes, and the engine formats (32-element OCP MX blocks)
    refuse another one instead of shipping bits the forward never used."""
    from megatron_qat import mxfp4
    from megatron_qat.export import ExpertGroups, ExportError, export_mxfp4

    monkeypatch.setenv("OPEN_TRAINING_MXFP4_BLOCK_SIZE", "16")
    w = global_weights(0, 4, True)
    chunk = build_chunk([1], make_config(), pg_collection(), lambda k: w)
    got = dict(export_mxfp4(chunk, "raw", groups=ExpertGroups()))
    name = "decoder.layers.0.mlp.experts.linear_fc2.weight3"
    assert got[name + ".mxfp4_scales"].shape == (H, I // 16)
    decoded = mxfp4.dequantize(got[name + ".mxfp4_codes"], got[name + ".mxfp4_scales"], torch.bfloat16, 16)
    assert torch.equal(decoded.view(torch.int16), mxfp4.fake_quantize(w["fc2"][3], 16).view(torch.int16))
    with pytest.raises(ExportError, match="blocks of 32 elements.*block size 16"):
        list(export_mxfp4(chunk, "gpt-oss", groups=ExpertGroups()))
