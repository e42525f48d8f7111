#!/usr/bin/env bash
# One batched GPU session: correctness on the GPU first, then benchmarks. Logs and results go to $OUT.
# usage: bash benchmarks/gpu_session.sh STAGE...
# (stages: tests, ktests, gen-quick, gen, decode-ab, gemv, profile, kernels, awq, serving)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests) timeout 300 python3 -m pytest tests/kernels tests/engine/test_gpu_engine.py -q -x -n 8 -p no:cacheprovider \
             2>&1 | tail -40 | tee "$OUT/tests.log" ;;
    gen-quick) timeout 400 python3 benchmarks/bench_generation.py --shapes llama2-7b --configs fp16 --quick \
             --out "$OUT/gen" 2>&1 | tail -60 ;;
    gen) timeout 560 python3 benchmarks/bench_generation.py --shapes "${SHAPES:-llama2-7b}" \
             --configs "${CONFIGS:-fp16}" ${GEN_FLAGS:-} --out "$OUT/gen" 2>&1 | tail -60 ;;
    profile) timeout 300 python3 benchmarks/profile_step.py ${PROFILE_FLAGS:-} --out "$OUT/prof" 2>&1 | tail -120 ;;
    kernels) timeout 240 python3 -m benchmarks.bench_kernels --out "$OUT/kernels" 2>&1 | tail -40 ;;
    gemv) timeout 400 python3 benchmarks/bench_gemv.py ${GEMV_FLAGS:-} --out "$OUT/gemv" 2>&1 | tail -80 ;;
    ktests) timeout 300 python3 -m pytest ${KTESTS:-tests/kernels} -q -x -n 8 -p no:cacheprovider 2>&1 | tail -30 ;;
    decode-ab) for v in "ENGINE_GEMV=0 ENGINE_PDL=0" "ENGINE_GEMV=1 ENGINE_PDL=0" "ENGINE_GEMV=1 ENGINE_PDL=1"; do
             echo "--- $v"; env $v timeout 200 python3 benchmarks/bench_generation.py --shapes "${SHAPES:-llama2-7b}" \
             --configs "${CONFIGS:-fp16,awq}" --decode-only --out "$OUT/decode-ab/${v// /_}" 2>&1 | grep -v Warning | tail -6
           done ;;
    awq) timeout 400 python3 benchmarks/bench_awq.py ${AWQ_FLAGS:-} --out "$OUT/awq" 2>&1 | tail -30 ;;
    serving) timeout 300 python3 benchmarks/bench_serving.py ${SERVING_FLAGS:-} --out "$OUT/serving" 2>&1 | tail -30 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
