"""The three quantizers a parity run touches: the golden model, FlashInfer, and ours.

Every reference implements one rule (:mod:`megatron_qat.numerics.rules`; the run checks ours under
it) in blocks of its ``block_size``, and maps a CPU tensor ``x [R, K]`` (bf16/fp16/fp32, finite
rows) to ``(payload, values float32 [R, K])`` on the CPU: an
:class:`~megatron_qat.mxfp4.payload.MXPayload` (codes uint8 ``[R, K/2]``, scales uint8
``[R, K/block_size]``) and ``values``, that reference's own decode of them.

- :class:`GoldenReference` (:mod:`.golden`, NumPy, independent of megatron_qat.mxfp4): any of
  the three E2M1 rules; decodes 0x8 as -0.0.
- :class:`FlashInferReference`: ``flashinfer.fp4_quantize(x, None, 32, True,
  is_sf_swizzled_layout=False)`` on CUDA (rule FLASHINFER_MXFP4 only), decoded by
  ``flashinfer.mxfp4_dequantize_host`` (CPU), whose lookup table maps 0x8 to +0.0: value
  comparisons against it normalise -0.0 to +0.0.
- :class:`Ours`: ``megatron_qat.mxfp4.quantize`` / ``dequantize`` / ``fake_quantize``.
"""

from __future__ import annotations

import torch

from ..mxfp4.payload import MXPayload
from ..numerics.constants import DEFAULT_BLOCK_SIZE
from ..numerics.rules import FLASHINFER_MXFP4, Element, Rule, ScaleRounding
from .canary import canary, canary_problems
from .errors import ParityError

SF_VEC_SIZE = DEFAULT_BLOCK_SIZE  # fp4_quantize's sf_vec_size: the only MXFP4 block FlashInfer implements
SM100 = (10, 0)
FLASHINFER_DEVICE = "cuda:0"  # where fp4_quantize runs (tests substitute "cpu" with a fake module)
SM100_ONLY = (
    "FlashInfer's MXFP4 kernel body (fp4_quantize with sf_vec_size=32, sf_use_ue8m0=True) is compiled only "
    "for sm_100+; below that it returns uninitialized memory (measured on sm_90)"
)


def golden_arguments(rule: Rule) -> dict:
    """``rule`` as :func:`.golden.quantize`'s plain arguments; ParityError for a rule it does not model."""
    if rule.element is not Element.E2M1:
        raise ParityError(f"rule {rule.name}: the golden model implements the E2M1 (MXFP4) rules only")
    return {"scale": "even" if rule.scale is ScaleRounding.EVEN else "ceil", "ties": rule.ties.value, "ftz": rule.ftz}


class GoldenReference:
    name = "golden"
    decodes_negative_zero = True  # 0x8 -> -0.0

    def __init__(self, reason: str, rule: Rule = FLASHINFER_MXFP4):
        from . import golden

        self.reason = reason
        self.rule = rule
        self.arguments = golden_arguments(rule)
        self.block_size = golden.BLOCK

    def unsupported(self, dtype: torch.dtype) -> str | None:
        return None

    def quantize(self, x: torch.Tensor):
        from . import golden

        codes, scales = golden.quantize(x.float().numpy(), **self.arguments)
        values = golden.decode(codes, scales)
        return MXPayload(torch.from_numpy(codes), torch.from_numpy(scales), self.block_size, self.rule), torch.from_numpy(values)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "reason": self.reason,
            "implementation": "megatron_qat.parity.golden (NumPy, independent of megatron_qat.mxfp4), "
            + ", ".join(f"{k}={v!r}" for k, v in self.arguments.items()),
            "rule": self.rule.name,
            "decodes_0x8_as": "-0.0",
            "negative_zero_normalised": False,
        }


class FlashInferReference:
    name = "flashinfer"
    decodes_negative_zero = False  # mxfp4_dequantize_host's table maps 0x8 to +0.0

    rule = FLASHINFER_MXFP4  # fp4_quantize(sf_use_ue8m0=True) is this rule; no other

    def __init__(self, flashinfer_module, device: str, reason: str):
        self.fi = flashinfer_module
        self.device = device
        self.reason = reason
        self.block_size = SF_VEC_SIZE

    def unsupported(self, dtype: torch.dtype) -> str | None:
        if dtype not in (torch.bfloat16, torch.float16):
            return f"skipped: flashinfer fp4_quantize takes bfloat16/float16, not {str(dtype).replace('torch.', '')}"
        return None

    def _poison(self, rows: int, k: int) -> None:
        """Fill then free buffers the size of fp4_quantize's outputs, so that a kernel that writes
        nothing hands back 0xA5 bytes instead of stale (possibly correct-looking) data."""
        sizes = (rows * k // 2, ((rows + 15) // 16) * 16 * k // self.block_size)
        bufs = [torch.full((n,), 0xA5, dtype=torch.uint8, device=self.device) for n in sizes]
        del bufs

    def quantize(self, x: torch.Tensor):
        rows, k = x.shape
        xd = x.to(self.device).contiguous()
        self._poison(rows, k)
        bs = self.block_size
        codes, sf = self.fi.fp4_quantize(xd, None, bs, True, is_sf_swizzled_layout=False)
        codes = codes.view(torch.uint8).reshape(rows, k // 2).cpu().contiguous()
        # Linear layout: the first rows * K/32 bytes, row-major (some versions return the padded
        # flat buffer, newer ones [rows, K/32]; both start with the same bytes).
        scales = sf.view(torch.uint8).reshape(-1)[: rows * (k // bs)].reshape(rows, k // bs).cpu().contiguous()
        values = self.fi.mxfp4_dequantize_host(codes, scales, bs).float()
        return MXPayload(codes, scales, bs, self.rule), values

    def check_canary(self) -> None:
        x, _, _, _ = canary()
        try:
            payload, values = self.quantize(x)
        except Exception as exc:  # JIT build or launch failure: reported, exit 2
            raise ParityError(f"--reference flashinfer: fp4_quantize failed on the canary ({type(exc).__name__}: {exc})") from exc
        problems = canary_problems(payload.codes, payload.scales, values)
        if problems:
            raise ParityError(
                f"--reference flashinfer: the canary failed on {_gpu_name(self.device)}: " + "; ".join(problems)
                + f". Refusing to use FlashInfer as the reference ({SM100_ONLY}). Use --reference golden."
            )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "reason": self.reason,
            "implementation": "flashinfer.fp4_quantize(x, None, 32, True, is_sf_swizzled_layout=False) + "
            "flashinfer.mxfp4_dequantize_host",
            "version": getattr(self.fi, "__version__", None),
            "device": _gpu_name(self.device),
            "decodes_0x8_as": "+0.0",
            "negative_zero_normalised": True,
            "canary": "passed",
            "rule": self.rule.name,
        }


def _gpu_name(device: str) -> str:
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return str(device)
    cap = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})"


def _import_flashinfer():
    import flashinfer

    return flashinfer


def choose_reference(choice: str, allow_unsupported_gpu: bool, rule: Rule = FLASHINFER_MXFP4):
    """``auto`` / ``golden`` / ``flashinfer`` -> a reference of ``rule`` (canary already passed for FlashInfer).

    Raises ParityError (exit 2) when ``flashinfer`` is requested but unusable (or cannot make ``rule``)."""
    if choice == "golden":
        return GoldenReference("requested with --reference golden", rule)
    if allow_unsupported_gpu and choice != "flashinfer":
        raise ParityError("--allow-unsupported-gpu only applies to --reference flashinfer")
    if rule is not FLASHINFER_MXFP4:
        if choice == "flashinfer":
            raise ParityError(
                f"--reference flashinfer: fp4_quantize makes rule {FLASHINFER_MXFP4.name}, not {rule.name} (the recipe's "
                "weight rule); use --reference golden"
            )
        return GoldenReference(f"auto: FlashInfer has no quantizer of rule {rule.name}", rule)
    if not torch.cuda.is_available():
        if choice == "flashinfer":
            raise ParityError("--reference flashinfer needs a CUDA GPU; none is visible. Use --reference golden.")
        return GoldenReference("auto: no CUDA GPU, so FlashInfer cannot run")
    cap = torch.cuda.get_device_capability(0)
    if cap < SM100:
        if choice == "flashinfer" and not allow_unsupported_gpu:
            raise ParityError(
                f"--reference flashinfer: {_gpu_name('cuda:0')} has compute capability {cap[0]}.{cap[1]} < 10.0. "
                f"{SM100_ONLY}. Use --reference golden (or --allow-unsupported-gpu to watch the canary refuse it)."
            )
        if choice == "auto":
            return GoldenReference(f"auto: GPU compute capability {cap[0]}.{cap[1]} < 10.0 ({SM100_ONLY})")
    try:
        fi = _import_flashinfer()
    except ImportError as exc:
        if choice == "flashinfer":
            raise ParityError(f"--reference flashinfer: cannot import flashinfer ({exc}); install flashinfer-python or use --reference golden") from exc
        return GoldenReference(f"auto: flashinfer not importable ({exc})")
    why = "requested with --reference flashinfer" if choice == "flashinfer" else f"auto: flashinfer importable, GPU sm_{cap[0]}{cap[1]}"
    if cap < SM100:
        why += " (--allow-unsupported-gpu: capability check skipped)"
    ref = FlashInferReference(fi, FLASHINFER_DEVICE, why)
    ref.check_canary()
    return ref


class Ours:
    """megatron_qat.mxfp4 on ``device`` with ``impl`` (None: its own dispatch), under the
    reference's rule and in blocks of its ``block_size``."""

    def __init__(self, device: str, impl: str | None, block_size: int, rule: Rule = FLASHINFER_MXFP4):
        self.device = device
        self.impl = impl
        self.block_size = block_size
        self.rule = rule

    def check(self, dtypes) -> None:
        """Before the run: the requested implementation (``--impl`` / ``MEGATRON_QAT_KERNEL``) can run on
        ``device`` for every dtype; ParityError (exit 2) with megatron_qat.mxfp4's reason otherwise."""
        from megatron_qat.mxfp4 import resolve_impl

        for dtype in sorted(dtypes, key=str):
            try:
                resolve_impl(torch.zeros(1, self.block_size, dtype=dtype, device=self.device), self.impl)
            except (ValueError, RuntimeError) as exc:  # the dispatch's refusal of a bad or impossible choice
                where = "--impl" if self.impl is not None else "the environment"
                raise ParityError(f"megatron_qat.mxfp4 cannot run as {where} asks on {self.device}: {exc}".replace("impl=", "--impl=")) from None

    def resolved_impl(self, x: torch.Tensor) -> str:
        from megatron_qat.mxfp4 import resolve_impl

        return resolve_impl(x[:1].to(self.device), self.impl)

    def run(self, x: torch.Tensor):
        """-> (payload [R, K], its dequantize(float32) [R, K], fake_quantize in x.dtype [R, K]), on the CPU."""
        from megatron_qat import mxfp4

        xd = x.to(self.device)
        payload = MXPayload.quantize(xd, self.block_size, rule=self.rule, impl=self.impl)
        dq = payload.dequantize(torch.float32)
        fq = mxfp4.fake_quantize(xd, self.block_size, impl=self.impl, rule=self.rule)
        return payload.cpu(), dq.cpu(), fq.cpu()

    def describe(self) -> dict:
        return {"module": "megatron_qat.mxfp4", "device": self.device, "impl_requested": self.impl, "rule": self.rule.name}
