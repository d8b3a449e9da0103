#!/usr/bin/env bash
# Every GPU check behind docs/validation.md, on the lent GPU (shared/device/README.md stages TE 2.20.2,
# megatron-core 0.19.2 and FlashInfer; the kernel modes need none of them). Modes, in the order one
# lease runs them:
#   smoke     the Triton paths the hot path takes (prepared grouped launch, activation QDQ) vs the
#             PyTorch reference, bit for bit, in seconds: run first, before staging TE
#   kernel    the GPU tests that need no TE (kernels, rules, statistics kernel, CUDA graphs)
#   tests     every GPU test (tests/gpu: kernels, rules, statistics kernel, Megatron/TE patch, cache,
#             CUDA graphs, recipes, export, metrics, autoload with the installed wheel, EP=1 training),
#             parity refusals, the one-GPU run of the EP training check (GPU_TESTS="file ...": only
#             those test files, nothing else; TESTS_TIMEOUT: seconds for pytest, default 480)
#   bench     benchmarks/bench_qdq.py and benchmarks/bench_metrics.py -> $OUT/qdq.md, $OUT/metrics.md
#   step      benchmarks/bench_step.py -> $OUT/step.md (STEP_ARGS adds arguments)
#   mismatch  benchmarks/bench_mismatch.py -> $OUT/mismatch_<gpu>.{md,json}
#   multigpu  issue 19 on >= 2 GPUs: EP=2 training check (both dispatchers), NCCL weight-sync benchmark
#             -> $OUT/export_<gpu>-nccl.md
# Before `tests`: `pip wheel --no-deps -w .device/dist .` here and carry .device/dist (the autoload test
# needs the wheel INSTALLED: PYTHONPATH does not process .pth files). Before `mismatch`: carry
# .device/hf (transformers and what it imports; see benchmarks/bench_mismatch.py).
# Logs of each mode come back as ONE archive, $OUT/<mode>-logs.tgz (the device tool returns at most 8
# files), next to the result files.
set -u
OUT="${OUT:-/tmp/mqat_out}"; mkdir -p "$OUT"
LOGS="$(mktemp -d)"
[ -f /opt/mqat/env.sh ] && source /opt/mqat/env.sh  # TE/Megatron/FlashInfer (kernel-only modes need none)
[ -d .device/hf ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /opt/mqat/hf .device/hf/*.whl \
  && export PYTHONPATH="/opt/mqat/hf${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {  # step NAME TIMEOUT_S COMMAND...: run, keep the log, print rc and the log's tail
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc"; tail -n "${TAILN:-4}" "$LOGS/$name.log"
}
finish() { tar czf "$OUT/${MODE}-logs.tgz" -C "$LOGS" . ; }
MODE="${1:-tests}"; trap finish EXIT
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cc', torch.cuda.get_device_capability())"
  python3 -c "import transformer_engine as te, megatron.core as m, flashinfer as f; print('TE', te.__version__, 'megatron-core', m.__version__, 'flashinfer', f.__version__)" 2>&1 | tail -1
} > "$LOGS/device.log" 2>&1; cat "$LOGS/device.log"
GPU_KERNEL_TESTS="tests/gpu/test_triton_gpu.py tests/gpu/test_rules_gpu.py tests/gpu/test_grouped_cuda_graph.py tests/gpu/test_metrics_kernel_gpu.py"
GPU_TE_TESTS="tests/gpu/test_megatron_gpu.py tests/gpu/test_weight_cache_gpu.py tests/gpu/test_cuda_graph_patched_gpu.py tests/gpu/test_recipes_gpu.py tests/gpu/test_export_gpu.py tests/gpu/test_metrics_gpu.py tests/gpu/test_autoload_gpu.py tests/gpu/test_ep2_training_gpu.py tests/gpu/test_parity_flashinfer_gpu.py"
case "$MODE" in
  smoke)
    TAILN=12 step smoke 300 python3 tests/gpu/hot_path_smoke.py ;;
  kernel)
    TAILN=25 step kernel_tests 540 python3 -m pytest -q -rs -p no:cacheprovider $GPU_KERNEL_TESTS \
      tests/test_triton_kernel.py tests/test_triton_rules.py tests/test_dispatch.py tests/test_metrics_kernel.py ;;
  tests)
    if ls .device/dist/megatron_qat-*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --force-reinstall .device/dist/megatron_qat-*.whl && echo "installed the wheel"
    fi
    TAILN=30 step gpu_tests "${TESTS_TIMEOUT:-480}" python3 -m pytest -q -rs -p no:cacheprovider ${GPU_TESTS:-$GPU_KERNEL_TESTS $GPU_TE_TESTS}
    [ -n "${GPU_TESTS:-}" ] && exit 0  # a chosen subset: no parity / EP=1 run
    { for args in "--reference flashinfer" "--reference flashinfer --allow-unsupported-gpu" "--device cuda --reference golden"; do
        echo "\$ megatron-qat parity $args"; python3 -m megatron_qat.parity $args 2>&1 | grep -v "^OK " | tail -4; echo "exit code: ${PIPESTATUS[0]}"; done; } > "$LOGS/parity.log" 2>&1
    cat "$LOGS/parity.log"
    RUN="python3 -m torch.distributed.run --standalone --nproc-per-node 1"
    TAILN=4 step ep1_training 120 $RUN tests/gpu/ep2_training.py --backend nccl --ep 1 ;;
  bench)
    TAILN=50 step bench_qdq 330 python3 benchmarks/bench_qdq.py --no-compile --out "$OUT/qdq.md" ${BENCH_ARGS:-}
    TAILN=30 step bench_metrics 240 python3 benchmarks/bench_metrics.py --out "$OUT/metrics.md" ${METRICS_ARGS:-} ;;
  step)
    TAILN=60 step bench_step 580 python3 benchmarks/bench_step.py --out "$OUT/step.md" --profile-calls "$LOGS/calls" ${STEP_ARGS:-} ;;
  mismatch)
    TAILN=40 step bench_mismatch 580 python3 benchmarks/bench_mismatch.py --out-dir "$OUT" --no-plot ${MISMATCH_ARGS:-} ;;
  multigpu)
    RUN="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
    TAILN=6 step ep2_alltoall 300 $RUN tests/gpu/ep2_training.py --backend nccl --dispatcher alltoall
    TAILN=6 step ep2_allgather 300 $RUN tests/gpu/ep2_training.py --backend nccl --dispatcher allgather
    TAILN=12 step bench_export_nccl 400 $RUN benchmarks/bench_export.py --backend nccl --out "$OUT" ;;
  *) echo "unknown mode $MODE (smoke, kernel, tests, bench, step, mismatch, multigpu)"; exit 2 ;;
esac
