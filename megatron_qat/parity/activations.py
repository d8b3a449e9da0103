"""A recipe's ACTIVATION rule against the engine's own activation quantizer (``--recipe``).

What can be compared, per activation rule of :data:`megatron_qat.numerics.rules.RECIPES`:

- ``None`` (BF16 activations: ``*-w4a16``): nothing to compare.
- the recipe's weight rule itself (``vllm-online-w4a4``): the weight check (the golden model of
  that rule) covers the rule; vLLM's ``mxfp4_experts_quant`` kernel is not run here
  (docs/engines.md states where it differs).
- ``flashinfer-mxfp8`` (``flashinfer-trtllm-w4a8``): FlashInfer's quantizer as both engines call it
  on SM100, ``flashinfer.mxfp8_quantize(x, is_sf_swizzled_layout=False, alignment=K,
  backend="cute-dsl")`` (vLLM 0.33 ``mxfp8_utils.py``, SGLang 0.5.23 ``fp8_utils.py``), decoded by
  ``flashinfer.mxfp8_dequantize_host``. It needs a GPU of compute capability >= 10.0 (as
  ``fp4_quantize``, see :mod:`.references`); a hand-built canary (:func:`canary`, E4M3 codes and
  scale bytes written out by hand) must pass before it is trusted. Ours:
  :func:`megatron_qat.mxfp4.quantize` / :func:`~megatron_qat.mxfp4.fake_quantize_activation`
  under the rule. Tensors: every finite input family of :mod:`megatron_qat.numerics.families` in
  bf16 and fp16 (the E4M3 ties, top-of-range, subnormal and ``448 * 2**k +- ulp`` families included).
  Compared bit for bit: codes (E4M3 bytes), scale bytes, and the fake-quantized activation against
  FlashInfer's float32 decode rounded to the input dtype.

Without such a GPU (or without flashinfer) the activation rule is not compared and the run is
INCOMPLETE; ``--reference flashinfer`` asks for the comparison and is refused there (exit 2), and
with ``--allow-unsupported-gpu`` on sm_90 the canary is what refuses it.
"""

from __future__ import annotations

import torch

from ..mxfp4.payload import MXPayload
from ..numerics.constants import DEFAULT_BLOCK_SIZE
from ..numerics.rules import FLASHINFER_MXFP8, Recipe
from . import references as refs
from .errors import ParityError

FLASHINFER_DEVICE = "cuda:0"  # where mxfp8_quantize runs (tests substitute "cpu" with a fake module)
E4M3 = torch.float8_e4m3fn
# (values, exponent e): amax 448 * 2**e pins the scale byte to 127 + e (448 * fp32(1/448) == 1.0)
_GRID = [448.0, 256.0, 1.0, 0.5, 2.0**-9, -448.0, -1.5, 0.0, 3.25, -0.015625, 104.0, -2.0**-6, 7.0, 0.875, -224.0, 13.0]
# RNE ties between E4M3 neighbours, and what they round to: 1.0625 -> 1.0, 1.1875 -> 1.25, 17 -> 16, 3.125 -> 3.0,
# 2**-10 (half the smallest subnormal) -> 0, 3 * 2**-10 -> 2**-8 (0b010 subnormal mantissa, even)
_TIES = [(448.0, 448.0), (1.0625, 1.0), (1.1875, 1.25), (17.0, 16.0), (3.125, 3.0), (-1.0625, -1.0), (2.0**-10, 0.0),
         (3 * 2.0**-10, 2.0**-8)]
_BLOCKS = [(_GRID * 2, None, 0), (_GRID * 2, None, 4), ([v for v, _ in _TIES] * 4, [w for _, w in _TIES] * 4, 0),
           (_GRID * 2, None, -3)]


def canary() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x bf16 [2, 64], E4M3 codes uint8 [2, 64], scale bytes uint8 [2, 2]), written out by hand:
    every value is exact in bf16 and its E4M3 result is a grid value (or a tie's even neighbour)."""
    xs, want, scales = [], [], []
    for values, rounded, e in _BLOCKS:
        xs.extend(v * 2.0**e for v in values)
        want.extend(values if rounded is None else rounded)
        scales.append(127 + e)
    x = torch.tensor(xs, dtype=torch.bfloat16).reshape(2, 64)
    codes = torch.tensor(want, dtype=torch.float32).to(E4M3).view(torch.uint8).reshape(2, 64)  # exact: grid values
    return x, codes, torch.tensor(scales, dtype=torch.uint8).reshape(2, 2)


class FlashInferMXFP8:
    """``flashinfer.mxfp8_quantize`` (cute-dsl backend, linear scale layout) as a reference of
    :data:`FLASHINFER_MXFP8`: ``x [R, K]`` (bf16/fp16, CPU) -> (payload, values float32 [R, K])."""

    rule = FLASHINFER_MXFP8
    block_size = DEFAULT_BLOCK_SIZE  # mxfp8_quantize's fixed sf vector

    def __init__(self, flashinfer_module, device: str):
        self.fi = flashinfer_module
        self.device = device

    def quantize(self, x: torch.Tensor):
        rows, k = x.shape
        xd = x.to(self.device).contiguous()
        bufs = [torch.full((n,), 0xA5, dtype=torch.uint8, device=self.device) for n in (rows * k, ((rows + 127) // 128) * 128 * k // 32)]
        del bufs  # freed poisoned memory: a kernel that writes nothing hands back 0xA5, not stale data
        q, sf = self.fi.mxfp8_quantize(xd, is_sf_swizzled_layout=False, alignment=k, backend="cute-dsl")
        codes = q.view(torch.uint8).reshape(rows, -1)[:, :k].cpu().contiguous()
        scales = sf.view(torch.uint8).reshape(-1)[: rows * (k // self.block_size)].reshape(rows, k // self.block_size).cpu().contiguous()
        values = self.fi.mxfp8_dequantize_host(codes.view(E4M3), scales, False).float().reshape(rows, k)
        return MXPayload(codes, scales, self.block_size, self.rule), values

    def check_canary(self) -> None:
        x, want_codes, want_scales = canary()
        try:
            payload, _ = self.quantize(x)
        except Exception as exc:  # JIT build / launch failure, an older flashinfer without backend="cute-dsl"
            raise ParityError(f"--recipe: flashinfer.mxfp8_quantize failed on the canary ({type(exc).__name__}: {exc})") from exc
        problems = []
        if not torch.equal(payload.codes, want_codes):
            problems.append(f"codes: {int((payload.codes != want_codes).sum())} of {want_codes.numel()} bytes differ")
        if not torch.equal(payload.scales, want_scales):
            problems.append(f"scale bytes: got {payload.scales.flatten().tolist()}, want {want_scales.flatten().tolist()}")
        if problems:
            raise ParityError(
                f"--recipe: the MXFP8 canary failed on {refs._gpu_name(self.device)}: " + "; ".join(problems)
                + ". Refusing flashinfer.mxfp8_quantize as the activation reference (it runs on compute capability >= 10.0)."
            )


def _not_compared(recipe: Recipe, reason: str) -> dict:
    return {"rule": recipe.activations.name, "status": "not compared", "reason": reason, "tensors": [],
            "code_mismatches": 0, "scale_mismatches": 0, "value_mismatches": 0}


def flashinfer_mxfp8(reference: str, allow_unsupported_gpu: bool) -> tuple[FlashInferMXFP8 | None, str]:
    """The MXFP8 reference (canary passed), or ``None`` and why not; ParityError where
    ``--reference flashinfer`` asked for it and it cannot be had."""
    asked = reference == "flashinfer"
    if reference == "golden":
        return None, "--reference golden: the golden model has no MXFP8 rule; flashinfer.mxfp8_quantize is the activation reference"
    if not torch.cuda.is_available():
        if asked:
            raise ParityError("--reference flashinfer needs a CUDA GPU for the MXFP8 activation rule; none is visible")
        return None, "flashinfer.mxfp8_quantize needs a CUDA GPU of compute capability >= 10.0; none is visible"
    cap = torch.cuda.get_device_capability(0)
    if cap < refs.SM100 and not (asked and allow_unsupported_gpu):
        if asked:
            raise ParityError(
                f"--reference flashinfer: {refs._gpu_name('cuda:0')} has compute capability {cap[0]}.{cap[1]} < 10.0; "
                "flashinfer.mxfp8_quantize (cute-dsl) runs on sm_100+ (--allow-unsupported-gpu runs the canary)"
            )
        return None, f"flashinfer.mxfp8_quantize runs on compute capability >= 10.0; this GPU is {cap[0]}.{cap[1]}"
    try:
        fi = refs._import_flashinfer()
    except ImportError as exc:
        if asked:
            raise ParityError(f"--reference flashinfer: cannot import flashinfer ({exc})") from exc
        return None, f"flashinfer not importable ({exc})"
    ref = FlashInferMXFP8(fi, FLASHINFER_DEVICE)
    ref.check_canary()
    return ref, f"flashinfer.mxfp8_quantize on {refs._gpu_name(FLASHINFER_DEVICE)}, canary passed"


def check_activations(recipe: Recipe, reference: str, allow_unsupported_gpu: bool, device: str, impl: str | None) -> dict | None:
    """The activation part of a ``--recipe`` run (``None`` for BF16 activations); see the module docstring."""
    if recipe.activations is None:
        return None
    if recipe.activations is recipe.weights:
        return {"rule": recipe.activations.name, "status": "equal", "reason": "the weight rule, checked above against "
                "its golden model (vLLM's own activation kernel is not run here)", "tensors": [],
                "code_mismatches": 0, "scale_mismatches": 0, "value_mismatches": 0}
    if recipe.activations is not FLASHINFER_MXFP8:
        return _not_compared(recipe, f"no reference of activation rule {recipe.activations.name} here")
    ref, why = flashinfer_mxfp8(reference, allow_unsupported_gpu)
    if ref is None:
        return _not_compared(recipe, why)
    from .. import mxfp4
    from ..numerics import families
    from ..numerics.format import INT_VIEW_DTYPES

    out = {"rule": recipe.activations.name, "status": "equal", "reason": why, "tensors": [],
           "code_mismatches": 0, "scale_mismatches": 0, "value_mismatches": 0}
    for dtype in families.SYNTHETIC_DTYPES:
        for name in families.FINITE_FAMILIES:
            x = families.make(name, families.SYNTHETIC_SHAPE, dtype, seed=0)
            want, values = ref.quantize(x)
            xd = x.to(device)
            got = MXPayload.quantize(xd, ref.block_size, rule=ref.rule, impl=impl).cpu()
            fake = mxfp4.fake_quantize_activation(xd, ref.rule, ref.block_size, impl=impl).cpu()
            view = INT_VIEW_DTYPES[dtype]
            counts = {
                "code_mismatches": int((got.codes != want.codes).sum()),
                "scale_mismatches": int((got.scales != want.scales).sum()),
                "value_mismatches": int((fake.view(view) != values.to(dtype).view(view)).sum()),
            }
            for key, n in counts.items():
                out[key] += n
            out["tensors"].append({"name": f"activations/{str(dtype).replace('torch.', '')}/{name}", **counts})
    if out["code_mismatches"] or out["scale_mismatches"] or out["value_mismatches"]:
        out["status"] = "mismatch"
    return out
