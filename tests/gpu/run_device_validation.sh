#!/usr/bin/env bash
# Every GPU check behind docs/validation.md, on the lent GPU, after shared/device/README.md's setup.
#   bash tests/gpu/run_device_validation.sh checks   # tests, Megatron validation, parity refusals
#   bash tests/gpu/run_device_validation.sh bench    # benchmarks/bench_qdq.py (BENCH_ARGS=--quick for a smoke run)
#   bash tests/gpu/run_device_validation.sh kernel   # Triton GPU tests, then the benchmark (no TE needed)
#   bash tests/gpu/run_device_validation.sh new      # the GPU tests of issues 8-11 (cache, CUDA graph, export, metrics)
#   bash tests/gpu/run_device_validation.sh step     # benchmarks/bench_step.py -> $OUT/step.md (issues 9 and 11)
# Logs go to $OUT (the device tool's output folder) or /tmp/mqat_out.
set -u
OUT="${OUT:-/tmp/mqat_out}"; mkdir -p "$OUT"
[ -f /opt/mqat/env.sh ] && source /opt/mqat/env.sh  # TE/Megatron/FlashInfer (kernel-only runs need none)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { local name=$1; shift; timeout 400 "$@" > "$OUT/$name.log" 2>&1; local rc=$?; echo "== $name rc=$rc"; tail -n "${TAILN:-4}" "$OUT/$name.log"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cc', torch.cuda.get_device_capability())"
  python3 -c "import transformer_engine as te, megatron.core as m, flashinfer as f; print('TE', te.__version__, 'megatron-core', m.__version__, 'flashinfer', f.__version__)" 2>&1 | tail -1
} > "$OUT/device.log" 2>&1; cat "$OUT/device.log"
case "${1:-checks}" in
  checks)
    step gpu_tests python -m pytest -q -rs tests/test_triton_kernel.py tests/test_dispatch.py tests/test_mxfp4_numerics.py tests/gpu/test_triton_gpu.py tests/gpu/test_parity_flashinfer_gpu.py
    TAILN=12 step megatron_triton python tests/gpu/run_megatron_validation.py
    TAILN=12 step megatron_reference env MEGATRON_QAT_KERNEL=reference python tests/gpu/run_megatron_validation.py
    { for args in "--reference flashinfer" "--reference flashinfer --allow-unsupported-gpu" "--device cuda --reference golden"; do
        echo "\$ megatron-qat parity $args"; python -m megatron_qat.parity $args 2>&1 | grep -v "^OK " | tail -4; echo "exit code: ${PIPESTATUS[0]}"; done; } > "$OUT/parity.log" 2>&1
    cat "$OUT/parity.log" ;;
  new)
    TAILN=20 step gpu_new python -m pytest -q -rs tests/gpu/test_megatron_gpu.py tests/gpu/test_weight_cache_gpu.py tests/gpu/test_grouped_cuda_graph.py tests/gpu/test_cuda_graph_patched_gpu.py tests/gpu/test_export_gpu.py tests/gpu/test_metrics_gpu.py
    TAILN=12 step megatron_triton python tests/gpu/run_megatron_validation.py ;;
  step)
    TAILN=80 step bench_step python benchmarks/bench_step.py --out "$OUT/step.md" ${STEP_ARGS:-} ;;
  kernel)
    step kernel_tests python -m pytest -q -rs tests/test_triton_kernel.py tests/test_dispatch.py tests/gpu/test_triton_gpu.py ;&
  bench)
    TAILN=60 step bench python benchmarks/bench_qdq.py --out "$OUT/qdq.md" ${BENCH_ARGS:-} ;;
esac
