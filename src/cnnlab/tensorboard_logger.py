"""TensorBoard as a run writes it: Lightning's TensorBoardLogger without the bookkeeping `epoch` scalar.

Lightning adds `epoch` to every batch of metrics it logs, which TensorBoard would show as a chart of its own at
the top of its first screen (its groups sort by name: `epoch` before `lr-…`, `train/` and `val/`). The x axis is
the step; the epoch is in each run's metrics.json and CSV log. Everything else is Lightning's.
"""

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger


class TensorBoardLogger(LightningTensorBoardLogger):
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step)
