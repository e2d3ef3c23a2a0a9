#!/usr/bin/env bash
# The MLflow picture of docs/tracking.md: a sweep of the two options with logger=mlflow into a store of its own,
# `mlflow ui` over it on 127.0.0.1, and a headless Chromium screenshot of MLflow's comparison of the sweep's runs.
#   bash bench/mlflow_screenshot.sh [overrides...]     e.g. data.root=../shared/data/cifar10-jpeg.tar.gz
# Needs chromium (apt-get install chromium); about 3 minutes on 2 CPU cores (2 jobs × 2 epochs). REUSE=1 takes
# the picture of the sweep already in the store.
set -euo pipefail
BIN=${BIN:-.venv/bin}
ROOT=outputs/mlflow-screenshot
PORT=${PORT:-5055}
if [ -z "${REUSE:-}" ]; then
    rm -rf "$ROOT"
    "$BIN/python" src/train.py -m logger=mlflow optimizer=adam,sgd_steplr trainer.max_epochs=2 verbose=false \
        outputs_root="$ROOT" "$@"
fi
STORE="sqlite:///$PWD/$ROOT/mlflow.db"
setsid "$BIN/mlflow" ui --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" > "$ROOT/ui.log" 2>&1 &
UI=$!
trap 'kill -- -$UI' EXIT  # the UI and the job workers it starts
for _ in $(seq 1 120); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/health" && break; sleep 0.5; done
PAGE=$("$BIN/python" -c "
import json, urllib.parse
from mlflow import MlflowClient
client = MlflowClient('$STORE')
(sweep,) = [e for e in client.search_experiments() if e.name.startswith('cnnlab/')]
runs = [r.info.run_id for r in client.search_runs([sweep.experiment_id])]
q = urllib.parse.quote
print(f'compare-runs?runs={q(json.dumps(runs))}&experiments={q(json.dumps([sweep.experiment_id]))}')")
chromium --headless=new --no-sandbox --hide-scrollbars --window-size=1600,1100 --virtual-time-budget=60000 \
    --screenshot=docs/mlflow-sweep.png "http://127.0.0.1:$PORT/#/$PAGE" 2> /dev/null
echo "docs/mlflow-sweep.png: $PAGE of $STORE"
