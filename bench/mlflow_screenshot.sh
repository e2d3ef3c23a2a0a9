#!/usr/bin/env bash
# The MLflow picture of docs/tracking.md: a sweep of the two options with logger=mlflow into a store of its own,
# `mlflow ui` over it on 127.0.0.1, and a headless Chromium screenshot of the sweep's experiment.
#   bash bench/mlflow_screenshot.sh [overrides...]     e.g. data.root=../shared/data/cifar10-jpeg.tar.gz
# Needs chromium (apt-get install chromium); about 5 minutes on 2 CPU cores (2 jobs × 2 epochs).
set -euo pipefail
BIN=${BIN:-.venv/bin}
ROOT=outputs/mlflow-screenshot
PORT=${PORT:-5055}
rm -rf "$ROOT"
"$BIN/python" src/train.py -m logger=mlflow optimizer=adam,sgd_steplr trainer.max_epochs=2 verbose=false \
    outputs_root="$ROOT" "$@"
STORE="sqlite:///$PWD/$ROOT/mlflow.db"
"$BIN/mlflow" ui --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" > "$ROOT/ui.log" 2>&1 &
UI=$!
trap 'kill $UI' EXIT
for _ in $(seq 1 120); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/health" && break; sleep 0.5; done
EXPERIMENT=$("$BIN/python" -c "
from mlflow import MlflowClient
(e,) = [e for e in MlflowClient('$STORE').search_experiments() if e.name.startswith('cnnlab/')]
print(e.experiment_id)")
chromium --headless=new --no-sandbox --hide-scrollbars --window-size=1600,1000 --virtual-time-budget=20000 \
    --screenshot=docs/mlflow-sweep.png "http://127.0.0.1:$PORT/#/experiments/$EXPERIMENT/runs?${VIEW:-}"
echo "docs/mlflow-sweep.png: experiment $EXPERIMENT of $STORE"
