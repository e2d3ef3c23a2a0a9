"""What the console leaves out: the libraries' lines that say nothing about this run, named one by one.

Two lists, the one place for them: `NOISE`, log records of Lightning's that a run's console drops (its adverts,
its device inventory, lines that repeat the header), and `LIBRARY_WARNINGS`, warnings raised inside a library
about the library itself (a deprecation one library hits in another), matched by message and by the module that
raises them, so that the same words from our own code still show. Warnings that say something true about a run
(a GPU left unused, a checkpoint folder that changed) are not in them. The run's log file keeps every record.
Imports only the standard library: Hydra builds `ConsoleNoise` while it sets up logging, before the run starts.
"""

import logging
import warnings

NOISE = (  # (logger, how its message starts)
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),  # adverts for Lightning's cloud services
    ("lightning.pytorch.utilities.rank_zero", "Trainer already configured with model summary callbacks"),
    ("lightning.pytorch.utilities.rank_zero", "GPU available:"),  # the header names the device
    ("lightning.pytorch.utilities.rank_zero", "TPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "HPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "Using bfloat16 Automatic Mixed Precision"),  # the header: precision
    ("lightning.pytorch.utilities.rank_zero", "Using 16bit Automatic Mixed Precision"),
    ("lightning.pytorch.utilities.rank_zero", "Loading `train_dataloader` to estimate number of stepping batches"),
    ("lightning.pytorch.utilities.rank_zero", "`Trainer.fit` stopped:"),  # the run ended as configured
    ("lightning.pytorch.utilities.rank_zero", "Restoring states from the checkpoint path"),  # ours says it
    ("lightning.pytorch.utilities.rank_zero", "Restored all states from the checkpoint"),
    ("lightning.pytorch.utilities.rank_zero", "Loaded model weights from the checkpoint"),  # the result names it
    ("lightning.fabric.utilities.seed", "Seed set to"),  # the header: seed
    # src/lr_find.py: Lightning's finder reloads the checkpoint it has just written itself
    ("lightning.pytorch.trainer.connectors.checkpoint_connector", "`weights_only` was not set, defaulting to"),
)
LIBRARY_WARNINGS = (  # (message, category, the module that raises it)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    (r"Precision .* is not supported by the model summary", UserWarning, r"lightning\..*"),  # its size estimate
)


HEADER = "cnnlab.header"  # the logger of the run's header, which `verbose=false` still prints


class ConsoleNoise(logging.Filter):
    """Drops the records of `NOISE` from the console (conf/hydra/default.yaml puts it on the console's handler,
    not on the log file's). With `quiet` (verbose=false) it lets through only the header and warnings."""

    quiet = False

    def filter(self, record: logging.LogRecord) -> bool:
        if ConsoleNoise.quiet and record.levelno < logging.WARNING and record.name != HEADER:
            return False
        message = record.getMessage()
        return not any(record.name == name and message.startswith(start) for name, start in NOISE)


def quiet_libraries(verbose: bool) -> None:
    """Ignore the warnings of `LIBRARY_WARNINGS` in this process (train() calls it before fit); with
    `verbose=false`, every warning, and every log record below WARNING but the header, on the console."""
    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if not verbose:
        warnings.simplefilter("ignore")
    ConsoleNoise.quiet = not verbose
