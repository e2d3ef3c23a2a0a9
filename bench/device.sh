#!/usr/bin/env bash
# Stage what a lent GPU machine lacks, here, before one device run (docs/benchmarks.md, "GPU"):
#   .whl/     wheels of hydra-core, omegaconf and antlr4-python3-runtime (pure Python; the machine has the rest)
#   .device/  the CIFAR-10 archive (../shared does not travel)
# Both folders are git-ignored. The device run then carries them and starts with the install:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site bash bench/gpu.sh .device/cifar10-jpeg.tar.gz "$OUT/gpu-bench.md"
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
data=${1:-../shared/data/cifar10-jpeg.tar.gz}
mkdir -p .whl .device
versions=$("$python" -c "import hydra, omegaconf, antlr4; print(hydra.__version__, omegaconf.__version__)")
read -r hydra omegaconf <<<"$versions"
"$python" -m pip download -q --no-deps -d .whl "hydra-core==$hydra" "omegaconf==$omegaconf"
"$python" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist on the registry: built here
cp "$data" .device/
du -sh .whl .device
