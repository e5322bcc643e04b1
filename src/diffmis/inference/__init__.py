"""Inference (layer 7): the in-memory :class:`Predictor` (``predictor.py``) and the file job
:func:`predict_paths` (``files.py``). Knows methods only through :class:`diffmis.methods.Method`; never imports
:mod:`diffmis.training`."""

from diffmis.inference.calibrate import calibrate_run, calibrate_split, load_cases
from diffmis.inference.files import InputCase, PredictSummary, find_inputs, predict_paths
from diffmis.inference.predictor import Prediction, Predictor

__all__ = ["Predictor", "Prediction", "InputCase", "PredictSummary", "find_inputs", "predict_paths", "calibrate_run",
           "calibrate_split", "load_cases"]
