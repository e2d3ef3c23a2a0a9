#!/usr/bin/env bash
# The slide CNN on one CUDA GPU, as one prepared script (a few minutes; planned for under 8 on an H100/H200):
#
#   bash bench/gpu.sh [DATA] [REPORT]
#     DATA    CIFAR-10 as data.root takes it      (default ../shared/data/cifar10-jpeg.tar.gz)
#     REPORT  markdown file the tables go into    (default outputs/gpu-bench.md)
#     PYTHON  environment variable: the interpreter (default python)
#
# 0. The tests marked gpu (tests/test_gpu.py): the design card's command, fast_gpu, 16- and bf16-mixed, the same
#    seed twice, export parity against a CUDA reference, and with 2 GPUs a DDP stop and resume.
# 1. Training throughput three ways on the GPU: ours (train(cfg)), a bare PyTorch loop with the same math, and
#    the usual per-sample DataLoader recipe (bench/bench.py --gpu --quick).
# 2. Time to the slides' 70.51 %, training images/s and seconds per epoch (bench/time_to_accuracy.py) for
#    - gpu_card: the design card's `python src/train.py optimizer=sgd_steplr trainer.accelerator=gpu`, with the
#      data on the GPU (data.on_device, the default), batched augmentation on the GPU and bf16 autocast;
#    - fast_gpu: experiment=fast_gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/cifar10-jpeg.tar.gz}
report=${2:-outputs/gpu-bench.md}
python=${PYTHON:-python}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # runs from a checkout, installed or not

"$python" -c "import sys, torch; torch.cuda.is_available() or sys.exit('error: bench/gpu.sh needs a CUDA GPU, and torch sees none')"
card=$("$python" -c "import torch; print(torch.cuda.get_device_name())")
mkdir -p "$(dirname "$report")"
printf '# The slide CNN on one %s\n\n`bash bench/gpu.sh`, %s.\n\n' "$card" "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$report"

start=$SECONDS
printf '## Tests marked gpu\n\n```\n' >>"$report"
"$python" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15 | tee -a "$report" || true
printf '```\n\n## Throughput\n\n' >>"$report"
"$python" bench/bench.py --gpu --quick --data "$data" --append "$report"
"$python" bench/time_to_accuracy.py --settings gpu_card fast_gpu --data "$data" --append "$report"
echo "bench/gpu.sh: $((SECONDS - start)) s; report in $report"
cat "$report"
