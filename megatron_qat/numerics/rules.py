"""The quantization rules and the engine recipes built from them, defined once (torch-free).

A :class:`Rule` says how one tensor is quantized per block of ``block_size`` (32) consecutive
elements along its last dim: the element format (:class:`Element`), how the E8M0 scale byte is
derived from the block maximum (:class:`ScaleRounding`), how element ties round (:class:`Ties`) and
whether float32-subnormal values are flushed to zero (``ftz``). Each named rule below states the
upstream function it mimics, with the file and version read, and every edge case; docs/numerics.md
has worked examples. A :class:`Recipe` pairs the expert-weight rule with the expert-activation rule
(or BF16 activations) of one engine configuration; :data:`RECIPES` is the registry and
:data:`DEFAULT_RECIPE` today's behaviour.

Common to every rule (our choices, the same everywhere):

- ``quantize`` refuses NaN/Inf input (ValueError naming the tensor); ``fake_quantize`` returns a
  block holding NaN or +-inf as all canonical NaN (``constants.NAN_BITS_*``), so a diverging tensor
  stays visible. The upstream behaviour on such blocks is stated per rule for reference only.
- The element sign is the sign of ``x``: ``-0.0`` and negative values that round to zero keep the
  sign bit (E2M1 code ``0x8``, E4M3 byte ``0x80``).
- bf16/fp16 inputs widen exactly to float32; float32 input (which the engines do not take) gets the
  same float32 arithmetic.
- Dequantize is ``element value * 2**(byte - 127)``, exact in float32 (byte 0 is the subnormal
  ``2**-127``), rounded to the output dtype by the IEEE cast (a value past its range is +-inf).

This module imports nothing but the standard library and :mod:`.constants`, so
``megatron_qat.config`` (read at interpreter start) can name the recipes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import constants

__all__ = [
    "Element",
    "ScaleRounding",
    "Ties",
    "Rule",
    "FLASHINFER_MXFP4",
    "VLLM_ONLINE_MXFP4",
    "TIES_DOWN_MXFP4",
    "FLASHINFER_MXFP8",
    "RULES",
    "rule_by_name",
    "Recipe",
    "RECIPES",
    "DEFAULT_RECIPE",
]


class Element(enum.Enum):
    """Element format of a block-scaled tensor."""

    E2M1 = "e2m1"  # 4 bits, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; two codes per byte (low nibble first)
    E4M3 = "e4m3"  # float8_e4m3fn: bias 7, max 448, subnormals m * 2**-9, 0x7F/0xFF NaN; one byte each

    @property
    def max_value(self) -> int:
        return constants.E2M1_MAX if self is Element.E2M1 else constants.E4M3_MAX

    @property
    def code_bits(self) -> int:
        return 4 if self is Element.E2M1 else 8


class ScaleRounding(enum.Enum):
    """How the E8M0 scale byte of a block is derived from its amax (float32, exact)."""

    # byte = ceil(log2(amax * RN(1 / element max))) + 127, saturated to [0, 254]: one float32 multiply
    # by the correctly rounded reciprocal, then the exponent field of the product plus one when its
    # mantissa is nonzero (FlashInfer, __nv_cvt_float_to_e8m0(satfinite, cudaRoundPosInf)).
    CEIL = "ceil"
    # vLLM online / triton downcast_to_mxfp "even" rule (E2M1 only): r = (bits(amax) + 0x200000) with
    # the mantissa cleared (amax rounded to a power of two, up when its mantissa is >= 1.75);
    # byte = exponent field of r - 2, at least 0; r = +inf (amax >= 1.75 * 2**127) gives 254.
    EVEN = "even"


class Ties(enum.Enum):
    """Where an element exactly halfway between two grid values goes."""

    EVEN = "even"  # round to nearest, ties to the even code (IEEE; cvt.rn.satfinite.*)
    TOWARD_ZERO = "toward-zero"  # round to nearest, ties to the smaller magnitude


@dataclass(frozen=True)
class Rule:
    """One quantization rule. ``mimics`` names the upstream function (file and version read).

    ``ftz``: float32-subnormal inputs become signed zeros before scaling, a subnormal
    ``amax * RN(1/max)`` gives scale byte 0, and bytes 0 and 254 scale the elements by 0 (the
    fast-math FlashInfer CUDA build). Without it every step is IEEE: subnormal inputs are scaled
    like any other value and byte 0 / 254 scale by ``2**127`` / ``2**-127`` (``EVEN``), or by 0
    where the upstream builds its multiplier that way (``FLASHINFER_MXFP8``, see its docstring).
    """

    name: str
    element: Element
    scale: ScaleRounding
    ties: Ties
    ftz: bool
    mimics: str

    def __post_init__(self):
        if self.scale is ScaleRounding.EVEN and self.element is not Element.E2M1:
            raise ValueError(f"rule {self.name}: the EVEN scale rule is defined for E2M1 elements only")
        if self.ties is Ties.TOWARD_ZERO and self.element is not Element.E2M1:
            raise ValueError(f"rule {self.name}: ties toward zero are defined for E2M1 elements only")
        if self.scale is ScaleRounding.EVEN and self.ftz:
            raise ValueError(f"rule {self.name}: the EVEN scale rule (vLLM's Triton kernel) does not flush subnormals")

    @property
    def rcp_bits(self) -> int:
        """float32 bits of RN(1 / element max), the CEIL rule's multiplier (unused by EVEN)."""
        return constants.RCP_SIX_BITS if self.element is Element.E2M1 else constants.RCP_448_BITS

    @property
    def codes_per_byte(self) -> int:
        """Storage: 2 (E2M1 nibbles, element 2i in the low nibble) or 1 (one E4M3 byte each)."""
        return 2 if self.element is Element.E2M1 else 1

    def __str__(self) -> str:
        return self.name


FLASHINFER_MXFP4 = Rule(
    name="flashinfer-mxfp4",
    element=Element.E2M1,
    scale=ScaleRounding.CEIL,
    ties=Ties.EVEN,
    ftz=True,
    mimics=(
        "FlashInfer 0.7.2 (main fb28d724) fp4_quantize(x, None, sf_vec_size=32, sf_use_ue8m0=True, "
        "is_sf_swizzled_layout=False) = cvt_warp_fp16_to_fp4<T, 32, UE8M0_SF=true> in "
        "csrc/nv_internal/tensorrt_llm/kernels/quantization_utils.cuh, JIT-built with -use_fast_math"
    ),
)
"""FlashInfer's MXFP4 quantizer (the default weight rule). Not vLLM's W4A4 activation rule:
vLLM's ``mxfp4_experts_quant`` calls vLLM's own copy of ``cvt_warp_fp16_to_fp4<UE8M0_SF=true>``,
which uses the EVEN scale (docs/engines.md).

Per block: ``p = amax * RN(1/6)`` (``rcp.approx.ftz(6)`` = 0x3E2AAAAB, measured on sm_90), one
float32 multiply with FTZ: ``p < 2**-126`` gives byte 0. ``byte = ceil(log2 p) + 127`` saturated
at 254. Elements: ``v = x * 2**(127 - byte)`` with FTZ (a float32-subnormal ``x`` is a signed zero;
bytes 0 and 254 multiply by 0), then ``cvt.rn.satfinite.e2m1x2.f32``: round to nearest even,
saturate at +-6. Reachable bytes for finite bf16/fp16/float32 input: 0..253. Upstream on non-finite
input (not ours): NaN encodes +6 (0x7), a block holding +-inf gets byte 254 and zero codes.
This is numerics/reference.py's rule since issue 1, bit for bit unchanged."""

VLLM_ONLINE_MXFP4 = Rule(
    name="vllm-online-mxfp4",
    element=Element.E2M1,
    scale=ScaleRounding.EVEN,
    ties=Ties.EVEN,
    ftz=False,
    mimics=(
        "vLLM 0.33.0 (PyPI wheel) --quantization mxfp4 online weight quantizer: "
        "vllm/model_executor/layers/quantization/utils/mxfp4_utils.py::mxfp4_quantize -> downcast_to_mxfp "
        "-> Triton _downcast_to_mxfp / _compute_quant_and_scale (lines 256-345 of that file)"
    ),
)
"""vLLM 0.33.0's online MXFP4 weight quantizer on NVIDIA GPUs (its own Triton kernel; later
vLLM main dispatches to FlashInfer's CuTe-DSL quantizer when FlashInfer is installed, a different rule).

Per block (``_compute_quant_and_scale``): ``amax`` over the block in float32 (exact widening).
``r = (bits(amax) + 0x200000) & 0x7F800000`` (the amax rounded to a power of two, up when its
mantissa is >= 1.75); ``s = floor(log2(r + (r == 0 ? 2**-126 : 0))) - 2`` clamped to [-127, 127];
``byte = bits(exp2(s)) >> 23``. On integers: ``byte = max(E(r) - 2, 0)`` with ``E`` the exponent
field, except ``r = +inf`` (amax >= 1.75 * 2**127, bf16/float32 only) where ``log2`` is inf and
the clamp gives ``s = 127``, byte 254. Zero and subnormal blocks (r = 0) and amax < 1.75 * 2**-124
give byte 0. Elements: ``v = x * (1 / 2**s)``, an exact power-of-two multiply (no FTZ: a subnormal
``x`` is scaled like any other value); byte 0 multiplies by ``2**127``, byte 254 by ``2**-127``
(IEEE reading of ``exp2`` / ``1.0 /``: in Triton's interpreter ``exp2(-127)`` is the subnormal
``2**-127``; on the GPU ``tl.exp2`` / fp32 division lower to ``ex2.approx.f32`` / ``div.full.f32``
without ``.ftz``: read, NOT run on a GPU). Then E2M1 round-to-nearest-even on the float32 bits
with a sticky bit, saturated at +-6 (``min(code, 7)``): the same as ``cvt.rn.satfinite.e2m1``.
The sign bit is the sign of ``v`` (``-0.0`` -> 0x8). Values above 6 * scale (amax mantissa in
[1.5, 1.75)) saturate to 6. Upstream on non-finite input (not ours): ``+-inf`` amax gives byte 254;
Triton's ``tl.max`` ignores NaN on the GPU (unverified)."""

TIES_DOWN_MXFP4 = Rule(
    name="ties-down-mxfp4",
    element=Element.E2M1,
    scale=ScaleRounding.CEIL,
    ties=Ties.TOWARD_ZERO,
    ftz=True,
    mimics=(
        "ModelOpt modelopt/torch/quantization/qtensor/mxfp4_tensor.py::MXFP4QTensor.quantize "
        "(commit 0991404) element rounding sum(|x| - [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5] > 0); "
        "Megatron-Bridge quantize_mxfp4_e2m1_like_scale / Relax fake_qat_mxfp4.py (torch.bucketize), "
        "per shared/notes/mxfp4-numerics-landscape.md"
    ),
)
"""FlashInfer's scale with E2M1 ties toward zero (ModelOpt export, Megatron-Bridge /
Megatron-Lite-style QAT).

Everything as :data:`FLASHINFER_MXFP4` (``p = amax * RN(1/6)`` with FTZ, ceil, saturating byte,
FTZ of subnormal inputs, bytes 0 and 254 scale by 0, saturation at +-6) except that an element
exactly halfway between two E2M1 magnitudes goes to the smaller one: 0.25 -> 0, 0.75 -> 0.5,
1.25 -> 1, 1.75 -> 1.5, 2.5 -> 2, 3.5 -> 3, 5 -> 4 (RNE sends 0.75, 1.75, 3.5 up).
Where ModelOpt's own code differs, we keep FlashInfer's behaviour: ModelOpt computes the scale as
``ceil(max(log2(amax / 6), -127))`` in the input dtype (a true division and a rounded ``log2``, so
near a power of two its ceil can land one lower), has no upper clamp, no FTZ, and encodes ``+0.0``
with the sign bit (``(2 - sign(0)) // 2 = 1`` -> 0x8)."""

FLASHINFER_MXFP8 = Rule(
    name="flashinfer-mxfp8",
    element=Element.E4M3,
    scale=ScaleRounding.CEIL,
    ties=Ties.EVEN,
    ftz=False,
    mimics=(
        'FlashInfer main fb28d7242b35 (= 0.7.2.post1) mxfp8_quantize(x, backend="cute-dsl"): '
        "flashinfer/quantization/kernels/mxfp8_quantize.py (MXFP8QuantizeLinearKernel) with "
        "quantization_cute_dsl_utils.py float_to_ue8m0_fast, ue8m0_to_inv_scale_fast, "
        "bfloat2_to_fp8x2_scaled / half2_to_fp8x2_scaled; called with backend='cute-dsl' by vLLM 0.33 "
        "mxfp8_utils.py::_mxfp8_e4m3_quantize_impl and SGLang 0.5.23 fp8_utils.py::flashinfer_mxfp8_quantize"
    ),
)
"""FlashInfer's MXFP8 activation quantizer, CuTe-DSL backend (the one both engines call on SM100).

Per block of 32: ``amax`` exact (``max.bf16x2`` / ``max.f32``, NaN-ignoring). ``p = amax *
fp32(1/448)`` (0x3B124925; 448 * it rounds to 1.0, so amax = 448 * 2**k gives p = 2**k exactly), an
IEEE float32 multiply (DSL arithmetic, no fast-math option on this compile). ``float_to_ue8m0_fast``:
``p <= 0`` -> 0; else exponent field + 1 if the mantissa is nonzero, except that a subnormal ``p``
(exponent 0) with mantissa <= 0x400000 (p <= 2**-127) gets no bump, so ``p`` in (2**-127, 2**-126)
gives 1 and p <= 2**-127 gives 0 (exactly ceil(log2 p) + 127, no FTZ); clamped to 254; +inf -> 254,
NaN -> 254 (``setp.le`` is false for NaN, then the clamp). ``ue8m0_to_inv_scale_fast``: byte 0 ->
0.0, else bits ``max(254 - byte, 0) << 23``, i.e. exactly ``2**(127 - byte)`` for bytes 1..253 and
0.0 for byte 254. Elements (inline PTX): ``mul.f32`` (IEEE, no FTZ: subnormal inputs are scaled),
clamp with ``min.f32 448`` / ``max.f32 -448`` (NaN -> +448), then ``cvt.rn.satfinite.e4m3x2.f32``:
round to nearest even onto E4M3 including its subnormals (multiples of 2**-9; below 2**-10 -> 0,
2**-10 itself is a tie -> 0), the sign kept (``-0.0`` and negatives rounding to zero -> 0x80).
Finite bf16/fp16 input never reaches byte 254 (amax would need > 448 * 2**126).
The CUDA backend (``cvt_warp_fp16_to_mxfp8`` in quantization_utils.cuh, ``-use_fast_math``) uses
``rcp.approx.ftz(448)`` and FTZ multiplies: it differs for amax < ~5.3e-36 (p flushed to byte 0, and
subnormal inputs flushed), for NaN and for inf; and whether ``rcp.approx(448)`` equals RN(1/448) on
SM100 is unmeasured. Upstream on non-finite input (not ours): NaN elements encode +448 (0x7E), a
+-inf amax gives byte 254, multiplier 0, inf * 0 = NaN -> +448 for the inf and +-0 elsewhere."""

RULES = {r.name: r for r in (FLASHINFER_MXFP4, VLLM_ONLINE_MXFP4, TIES_DOWN_MXFP4, FLASHINFER_MXFP8)}


def rule_by_name(name: str) -> Rule:
    """The named rule (the op schema carries rules as these names); ValueError lists the names."""
    rule = RULES.get(name)
    if rule is None:
        raise ValueError(f"unknown quantization rule {name!r}; known rules: {', '.join(RULES)}")
    return rule


@dataclass(frozen=True)
class Recipe:
    """What the rollout engine does to the expert GEMM inputs: ``weights`` is the rule of the expert
    weights, ``activations`` the rule of both expert GEMM inputs (fc1's input and fc2's input, the
    SwiGLU output), ``None`` for BF16 activations. ``engines`` says which engine configuration it
    matches (docs/engines.md has the sources)."""

    name: str
    weights: Rule
    activations: Rule | None
    engines: str


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "flashinfer-w4a16",
            FLASHINFER_MXFP4,
            None,
            "FlashInfer/TRT-LLM MXFP4 weights with BF16 activations: our exported checkpoints served by SGLang "
            "or vLLM (vLLM's default on SM100 for gpt-oss, Hopper Marlin/triton_kernels/CUTLASS W4A16)",
        ),
        Recipe(
            "flashinfer-trtllm-w4a8",
            FLASHINFER_MXFP4,
            FLASHINFER_MXFP8,
            "FlashInfer trtllm-gen MXFP4 x MXFP8 MoE on SM100: SGLang flashinfer_mxfp4 (gpt-oss default), vLLM "
            "FLASHINFER_TRTLLM_MXFP4_MXFP8 (opt-in), DeepSeek-V4 FP4 experts in both engines",
        ),
        Recipe(
            "vllm-online-w4a4",
            VLLM_ONLINE_MXFP4,
            # vLLM's mxfp4_experts_quant uses vLLM's own cvt_warp_fp16_to_fp4 copy with the EVEN scale
            # (docs/engines.md, "Is vLLM's W4A4 activation rule established?"), not FlashInfer's CEIL:
            # VLLM_ONLINE_MXFP4 equals it except byte-0 blocks (amax < ~1.75 * 2**-125: vLLM's
            # activation path writes zero codes) and amax >= 1.75 * 2**127 (byte 253 there, 254 here).
            VLLM_ONLINE_MXFP4,
            "vLLM 0.33 --quantization mxfp4 on a BF16 checkpoint, SM100: weights re-quantized by its Triton "
            "downcast_to_mxfp, CUTLASS_MXFP4_MXFP4 with both expert GEMM inputs through mxfp4_experts_quant",
        ),
        Recipe(
            "vllm-online-w4a16",
            VLLM_ONLINE_MXFP4,
            None,
            "vLLM 0.33 --quantization mxfp4 on a BF16 checkpoint with a BF16-activation MoE backend "
            "(Hopper: Triton / Marlin)",
        ),
        Recipe(
            "modelopt-w4a16",
            TIES_DOWN_MXFP4,
            None,
            "checkpoints exported by ModelOpt's MXFP4QTensor (ties toward zero), served with BF16 activations",
        ),
    )
}
DEFAULT_RECIPE = "flashinfer-w4a16"
