"""An exponential moving average of the weights: Lightning's EMAWeightAveraging, tested with what it validated."""

from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMAWeights(EMAWeightAveraging):
    """Lightning's EMA callback, with the test scoring the averaged weights that validation chose.

    Lightning 2.6 saves the averaged weights as a checkpoint's `state_dict` and the raw ones as
    `current_model_state`, and on loading a checkpoint puts the raw ones back into the model: right when a fit
    resumes, but `trainer.test(ckpt_path=best)` after the fit (the same Trainer, so the same callback) would then
    score the raw weights of the best epoch, not the averaged ones validation scored (tests/test_recipe.py). Outside
    a fit, the checkpoint's `state_dict` is kept, as eval.py and predict.py load it.
    """

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
