"""Training: the loop (``trainer.py``), checkpoints, EMA and the torchrun/DDP helpers."""

from diffmis.training.checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from diffmis.training.trainer import TrainResult, train

__all__ = ["train", "TrainResult", "save_checkpoint", "load_checkpoint", "load_weights_into"]
