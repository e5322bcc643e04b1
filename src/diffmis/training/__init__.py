"""Training (layer 7): the loop (``trainer.py``), data order, validation, the run folder, EMA and the torchrun
helpers. Knows methods only through :class:`diffmis.methods.Method`; never imports :mod:`diffmis.inference`."""

from diffmis.training.run_folder import resolve_run_config
from diffmis.training.trainer import TrainingError, TrainResult, train

__all__ = ["train", "TrainResult", "TrainingError", "resolve_run_config"]
