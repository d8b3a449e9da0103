"""Prepared launches: the hot-path calls that run every forward, at a few microseconds of host time.

Two calls run on every (micro-batch) forward: a module's grouped weight fake-quant on a cache miss
(:class:`PreparedGroup`, kept by :class:`megatron_qat.mxfp4.GroupedFakeQuantizer`) and the expert
activation fake-quant (:func:`fake_quantize_activation`). Triton's ordinary launch path binds and
specialises every argument in Python (tens of microseconds), and a grouped call also re-validates N
tensors and looks its table up. Here everything a launch needs is derived once, at the first call
for a key: the validated tensors, the pointer table, the grid, the output size and split shapes,
and the compiled kernel handle; a later call with the same key only allocates the output and
launches the compiled kernel directly (:class:`CompiledLaunch`).

**Triton API (fail closed).** :class:`CompiledLaunch` uses what triton 3.6 provides, read in
``python/triton/runtime/jit.py`` (``JITFunction.run`` returns the ``CompiledKernel`` and launches
with ``kernel.run(grid0, grid1, grid2, stream, kernel.function, kernel.packed_metadata,
launch_metadata, enter_hook, exit_hook, *args)``, ``args`` = every parameter in signature order,
constexprs included, which the generated launcher accepts as objects and ignores) and
``compiler/compiler.py`` (``CompiledKernel.run`` / ``.function`` / ``.packed_metadata``). Pointer
arguments may be Python ints (the launcher's ``getPointer`` takes a ``PyLong`` as the device
address). A Triton whose version is not in :data:`VERIFIED_TRITON`, or whose compiled kernel lacks
these pieces or has another parameter list, raises :class:`PreparedLaunchError` at the first call
instead of launching wrongly. With launch hooks registered (``triton.knobs.runtime.launch_enter_hook``
/ ``launch_exit_hook``, e.g. a profiler) the launch goes through ``CompiledKernel[grid]``, which
calls them. In Triton's interpreter (CPU tests) there is no compiled kernel: the same preparation is
kept and each launch goes through the interpreter.

**What a prepared launch may assume.** The compiled kernel was specialised on the first call's
arguments: pointers 16-byte aligned (checked again on every call for the pointers that change:
outputs and activations; an unaligned one takes Triton's ordinary path) and ``n_blocks`` of the
single-tensor kernel is ``do_not_specialize`` (any count below 2**31 reuses it).
No host synchronisation and no host-to-device copy: the calls can be captured in a CUDA graph
once warmed up (the first call compiles and, for a group, copies its table).
"""

from __future__ import annotations

import operator
import weakref

import torch
import triton

from ..numerics.format import DEFAULT_BLOCK_SIZE, check_block_size
from ..numerics.reference import check_rule
from ..numerics.rules import Rule
from . import qdq_jit, triton_qdq

VERIFIED_TRITON = ("3.6",)  # versions whose jit.py / compiler.py launch path was read (module docstring)

_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_I32_MAX = 2**31 - 1


class PreparedLaunchError(RuntimeError):
    """The installed Triton does not provide the compiled-kernel launch this module was written for."""


# Triton's interpreter is chosen before this package is imported (TRITON_INTERPRET=1), so it is read
# once here rather than on every launch (triton.knobs reads the environment on each access).
_INTERPRETING = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False


def _interpreting() -> bool:
    return _INTERPRETING


# torch.cuda.current_device / is_current_stream_capturing without their Python wrappers (CUDA builds).
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
_stream_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing)


def _raw_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


class CompiledLaunch:
    """Launch one compiled specialisation of a ``@triton.jit`` kernel without Triton's per-call
    argument binding. ``compiled`` is what ``kernel[grid](...)`` returned; ``arg_names`` the
    kernel's parameter names, which must equal the compiled kernel's (else PreparedLaunchError).
    ``self(grid0, stream, *args)`` launches a 1-D grid with ``args`` in signature order."""

    __slots__ = ("_compiled", "_run", "_function", "_metadata", "knobs")

    def __init__(self, compiled, arg_names):
        version = ".".join(triton.__version__.split(".")[:2])
        if version not in VERIFIED_TRITON:
            raise PreparedLaunchError(
                f"megatron_qat's prepared Triton launch was written against triton {', '.join(VERIFIED_TRITON)} "
                f"(CompiledKernel.run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata, "
                f"enter_hook, exit_hook, *args)); triton {triton.__version__} is installed. Read its "
                "python/triton/runtime/jit.py and add the version to megatron_qat.kernels.prepared.VERIFIED_TRITON "
                "once the launch path is the same"
            )
        missing = [a for a in ("run", "function", "packed_metadata", "src") if not hasattr(compiled, a)]
        names = list(getattr(getattr(getattr(compiled, "src", None), "fn", None), "arg_names", []) or [])
        if missing or names != list(arg_names) or not callable(getattr(compiled, "run", None)):
            raise PreparedLaunchError(
                f"the compiled Triton kernel has not the shape of triton 3.6's CompiledKernel (missing {missing}; "
                f"parameters {names} != {list(arg_names)}); refusing to launch it directly"
            )
        self._compiled = compiled
        self._run = compiled.run  # the generated launcher (initialises the module handles once)
        self._function = compiled.function
        self._metadata = compiled.packed_metadata
        self.knobs = triton.knobs.runtime

    def __call__(self, grid0: int, stream: int, *args) -> None:
        knobs = self.knobs
        if knobs.launch_enter_hook.calls or knobs.launch_exit_hook.calls:
            self._compiled[(grid0, 1, 1)](*args, stream=stream)  # calls the hooks (profilers)
            return
        self._run(grid0, 1, 1, stream, self._function, self._metadata, None, None, None, *args)


_SINGLE_ARGS = ("x_ptr", "out_ptr", "codes_ptr", "scales_ptr", "n_blocks", "KIND", "BS", "BS_P2", "NB",
                "WRITE_VALUES", "WRITE_CODES", "ELEM", "SCALE", "TIES", "FTZ")  # fmt: skip
_GROUPED_ARGS = ("base_ptr", "table_ptr", "out_ptr", "codes_ptr", "scales_ptr", "KIND", "BS", "BS_P2", "NB",
                 "IN_ALIGN", "WRITE_VALUES", "WRITE_CODES", "ELEM", "SCALE", "TIES", "FTZ")  # fmt: skip


def _constexpr_values(names, constexprs: dict) -> tuple:
    return tuple(constexprs[n] for n in names if n in constexprs)


class PreparedGroup:
    """Everything one grouped fake-quant launch over a fixed list of tensors needs, derived once.

    :meth:`matches` is the key check (same number of tensors, the same ``data_ptr``, shape and dtype
    each, all contiguous, the same device: a few attribute reads per tensor); :meth:`__call__`
    allocates the flat output, launches and returns the views shaped like the tensors. Built by
    :func:`prepare_group` after full validation; rebuilt whenever the key changes."""

    __slots__ = ("n", "ptrs", "shapes", "dtypes", "device", "total", "dtype", "uniform", "table", "grid",
                 "fast", "fast_args", "slow_args", "last_out", "graph")  # fmt: skip

    def matches(self, xs, ptrs=None) -> bool:
        """``ptrs``: ``[x.data_ptr() for x in xs]`` when the caller has them already."""
        try:
            return (
                len(xs) == self.n
                and (tuple(map(_DATA_PTR, xs)) if ptrs is None else tuple(ptrs)) == self.ptrs
                and tuple(map(_SHAPE, xs)) == self.shapes
                and tuple(map(_DTYPE, xs)) == self.dtypes
                and all(map(_IS_CONTIGUOUS, xs))
                and xs[0].device == self.device
            )
        except TypeError:  # not a tensor: the validating path names it
            return False

    def __call__(self) -> list[torch.Tensor]:
        out = torch.empty(self.total, dtype=self.dtype, device=self.device)
        if self.grid:
            self._launch(out)
        self.last_out = weakref.ref(out)
        return self._views(out)

    def _views(self, out: torch.Tensor) -> list[torch.Tensor]:
        if self.uniform is not None:
            return list(out.view(self.uniform).unbind(0))
        return triton_qdq.split(out, self.shapes)

    def produced(self, outs: list[torch.Tensor]) -> bool:
        """Whether ``outs`` are the views of this launch's last output (found through their ``_base``)."""
        out = outs[0]._base if outs and len(outs) == self.n else None
        return out is not None and out is self.last_out()

    def run_into(self, outs: list[torch.Tensor]) -> bool:
        """Run again into the flat output behind ``outs`` (:meth:`produced`); False when they are not
        its views.

        On CUDA this replays a CUDA graph of the launch (a few microseconds of host time instead of
        the launcher's twenty): the first run into an output captures the compiled launch, with
        every pointer it reads and writes fixed (the pointer table of the key's tensors, the
        output's ``data_ptr``), in a graph of its own on a side stream; later runs into the same
        output address replay it on the current stream. Launched directly instead (no graph): a
        different output address (the graph is captured again for the new one), another current
        device, an enclosing capture (the launch is captured into the caller's graph), Triton's
        launch hooks registered (they see every launch), the interpreter."""
        if not self.produced(outs):
            return False
        if not self.grid:
            return True
        out = outs[0]._base
        ptr = out.data_ptr()
        if self.fast is None or not self._graph_ok(ptr):
            self._launch(out)
            return True
        graph = self.graph
        if graph is None or graph[0] != ptr:
            self.graph = graph = (ptr, self._capture(out))
        graph[1].replay()
        return True

    def _graph_ok(self, ptr: int) -> bool:
        """Whether a launch into the output at address ``ptr`` may be a graph replay (see run_into)."""
        knobs = self.fast.knobs
        return (_current_device() == self.device.index and not _stream_capturing()
                and not (knobs.launch_enter_hook.calls or knobs.launch_exit_hook.calls) and not ptr % 16)

    def _capture(self, out: torch.Tensor):
        """A CUDA graph of one direct launch into ``out``, captured on a side stream (capture is not
        allowed on the legacy default stream) in ``thread_local`` error mode (other threads' CUDA
        calls, e.g. a communication thread, do not invalidate it). Capturing enqueues nothing; the
        launch does not allocate, so the graph's private memory pool stays empty. The pointer table
        it reads is marked captured (kept alive with the quantizer's slot). Dropping the graph while
        a replay is in flight is allowed: ``cuGraphExecDestroy`` frees an in-flight executable graph
        on completion (CUDA driver API reference)."""
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self.device)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self._launch(out)
            finally:
                graph.capture_end()
        return graph

    def _launch(self, out: torch.Tensor) -> None:
        if triton_qdq._capturing(out):
            self.table.captured = True  # a captured graph reads this table: the slot keeps it alive
        ptr = out.data_ptr()
        if self.fast is not None and not ptr % 16 and _current_device() == self.device.index:
            base, table, constexprs = self.fast_args
            self.fast(self.grid, _raw_stream(self.device.index), base, table, ptr, base, base, *constexprs)
            return
        base_t, table_t, constexprs = self.slow_args  # Triton's ordinary path (interpreter, odd cases)
        with triton_qdq._device_ctx(out):
            qdq_jit.qdq_grouped_kernel[(self.grid,)](
                base_t, table_t, triton_qdq._bits_view(out), base_t, base_t, **constexprs, num_warps=triton_qdq.NUM_WARPS
            )  # fmt: skip


def prepare_group(xs: list[torch.Tensor], block_size: int, rule: Rule, slot) -> tuple[PreparedGroup, list[torch.Tensor]]:
    """Validate ``xs`` (a list of tensors of one dtype and device), run one grouped fake-quant launch
    under ``rule`` with ``slot``'s pointer table (:class:`~megatron_qat.kernels.triton_qdq.GroupTableSlot`)
    and return ``(PreparedGroup, outputs)``. Non-contiguous members are copied for this call (their
    key never matches, so every call comes back here)."""
    check_rule(rule)
    check_block_size(block_size)
    originals = triton_qdq.check_group(xs, block_size)
    contiguous = [triton_qdq._check_tensor(t, block_size, f"xs[{i}]") for i, t in enumerate(originals)]
    flat, _, _, launched = triton_qdq._run_grouped(contiguous, block_size, True, False, rule, tables=slot)
    p = PreparedGroup()
    p.n = len(originals)
    p.ptrs = tuple(map(_DATA_PTR, originals))
    p.shapes = tuple(map(_SHAPE, originals))
    p.dtypes = tuple(map(_DTYPE, originals))
    p.device, p.dtype, p.total = originals[0].device, originals[0].dtype, flat.numel()
    p.uniform = (p.n, *p.shapes[0]) if len(set(p.shapes)) == 1 else None
    p.table, p.grid, p.fast, p.fast_args, p.slow_args, p.graph = None, 0, None, None, None, None
    outs = p._views(flat)
    p.last_out = weakref.ref(flat)
    if launched is not None:
        compiled, gt, grid, constexprs = launched
        live = [t for t in contiguous if t.numel()]
        base_t = triton_qdq._kernel_view(live[gt.base_index])
        p.table, p.grid, p.slow_args = gt, grid, (base_t, gt.table, constexprs)
        if p.device.type == "cuda" and not _interpreting():
            p.fast = CompiledLaunch(compiled, _GROUPED_ARGS)
            p.fast_args = (base_t.data_ptr(), gt.table.data_ptr(), _constexpr_values(_GROUPED_ARGS, constexprs))
    return p, outs


class ActivationLaunches:
    """The compiled single-tensor kernel of each (device, dtype, rule, block size, tile) one caller
    has launched: one :class:`CompiledLaunch` per compiled specialisation (bounded by the
    combinations used, a handful); the first call of a combination compiles through Triton's
    ordinary path. Owned by the caller (a :class:`megatron_qat.mxfp4.ActivationFakeQuantizer`, one
    per patched module): nothing global."""

    def __init__(self):
        self.handles: dict[tuple, tuple[CompiledLaunch, tuple]] = {}
        self._tiles: dict[int, tuple[int, int]] = {}  # block size -> (NB, BS_P2) of a full-size tensor

    def launch(self, x: torch.Tensor, out: torch.Tensor, block_size: int, rule: Rule) -> None:
        n_blocks = x.numel() // block_size
        tile = self._tiles.get(block_size)
        if tile is None:
            tile = self._tiles[block_size] = triton_qdq.launch_config(2**62, block_size)
        nb, bs_p2 = tile if n_blocks >= tile[0] else triton_qdq.launch_config(n_blocks, block_size)
        grid = -(-n_blocks // nb)
        xp, op = x.data_ptr(), out.data_ptr()
        key = (x.device.index, x.dtype, rule.name, block_size, nb)
        entry = self.handles.get(key)
        if entry is not None and not (xp % 16 or op % 16) and n_blocks <= _I32_MAX:
            run, constexprs = entry
            run(grid, _raw_stream(key[0]), xp, op, xp, xp, n_blocks, *constexprs)
            return
        constexprs = dict(KIND=triton_qdq._KIND[x.dtype], BS=block_size, BS_P2=bs_p2, NB=nb, WRITE_VALUES=True,
                          WRITE_CODES=False, **triton_qdq.rule_constexprs(rule))  # fmt: skip
        xv, ov = triton_qdq._kernel_view(x), triton_qdq._bits_view(out)
        with triton_qdq._device_ctx(x):
            compiled = qdq_jit.qdq_single_kernel[(grid,)](xv, ov, xv, xv, n_blocks, **constexprs, num_warps=triton_qdq.NUM_WARPS)
        if entry is None and not (xp % 16 or op % 16) and n_blocks <= _I32_MAX:
            self.handles[key] = (CompiledLaunch(compiled, _SINGLE_ARGS), _constexpr_values(_SINGLE_ARGS, constexprs))


def fake_quantize_activation(x: torch.Tensor, rule: Rule, block_size: int = DEFAULT_BLOCK_SIZE,
                             launches: ActivationLaunches | None = None) -> torch.Tensor:
    """Fake-quantize an activation ``x [..., K]`` (bf16/fp16/fp32, CUDA or, in the interpreter, CPU)
    under ``rule``: a new contiguous tensor of ``x``'s shape and dtype. A non-contiguous ``x`` is
    copied first (one extra pass). With the caller's ``launches`` on CUDA, from the second call of a
    (device, dtype, rule, block size, tile) on, the launch skips Triton's argument binding; without
    it every call takes Triton's ordinary launch. Validation is the caller's
    (:func:`megatron_qat.mxfp4.fake_quantize_activation`)."""
    if launches is None or x.device.type != "cuda" or _interpreting():  # Triton's ordinary launch
        return triton_qdq.fake_quantize(x, block_size, rule=rule)
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        if _current_device() != x.device.index:
            with torch.cuda.device(x.device):
                launches.launch(x, out, block_size, rule)
        else:
            launches.launch(x, out, block_size, rule)
    return out
