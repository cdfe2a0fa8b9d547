#!/usr/bin/env bash
# The GPU checks of issue 11 in one run (about 9 minutes on an H100 or H200), on a GPU machine whose python3 has
# torch, with .whl/ and .gpu-data/ from checks/gpu_bundle.sh beside it. Every figure lands in $OUT (default
# outputs/bench/gpu) as it comes:
#   1. checks/gpu_parity.py: `predict` with the winner's settings against the winner's literal loop, random
#      ViT-bigG-14-quickgelu, 1,024 images: gpu_parity.json, gpu_parity.log (versions first, the count last);
#   2. python -m helpers.bench: the loop (312 prompts) against fp32+autocast, fp16, fp16+compile and
#      fp16+compile=reduce-overhead on 4,096 images, with the matmul ceiling, peak GPU memory, each variant's
#      labels against the loop's, and a torch.profiler table of one batch of each: bench-bigG.json, bench-bigG.log,
#      bench-bigG/<variant>.txt.
#   bash checks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/bench/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import open_clip" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
{
    python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, \
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    timeout 200 python3 checks/gpu_parity.py --images 1024 --scene .gpu-data/Scene --out "$out/gpu_parity.json"
} 2>&1 | tee "$out/gpu_parity.log"
timeout 330 python3 -m helpers.bench --device cuda --arch ViT-bigG-14-quickgelu --images 4096 --batch-size 128 \
    --repeats 1 --skip-ablation --profile --scene .gpu-data/Scene --out "$out/bench-bigG.json" \
    2>&1 | tee "$out/bench-bigG.log"
