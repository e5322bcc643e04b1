"""Methods (layer 6): one file per paper, each a :class:`~diffmis.methods.base.Method` registered by name.

=====================  ================================================================================
recipe                 file
=====================  ================================================================================
``segmentor``          ``segmentor.py``: a discriminative segmentor alone (Dice + CE); the baseline
``medsegdiff``         ``medsegdiff.py``: Gaussian DDPM on the mask (MedSegDiff denoiser: DCE, FF-Parser);
                       ``conditional_unet`` is the same method with the plain conditional UNet (Wolleb)
``medsegdiff_v2``      ``medsegdiff_v2.py``: + condition segmentor (U-SA anchor, SS-Former) and anchor loss
``pd_ddpm``            ``pd_ddpm.py``: + pre-segmentation network; sampling starts at T' < T
``berdiff``            ``berdiff.py``: Bernoulli diffusion on the mask with the uniform prior 1/2
``hidiff``             ``hidiff.py``: segmentor prior + BBDM refiner, alternate-collaborative training
=====================  ================================================================================

Importing this package fills :data:`diffmis.registry.METHODS`; :func:`build` turns a config into a method.
"""

from typing import Any

from diffmis.config import Config
from diffmis.errors import ConfigError
from diffmis.methods import berdiff, hidiff, medsegdiff, medsegdiff_v2, pd_ddpm, segmentor  # noqa: F401
from diffmis.methods.base import LossOutput, Method, Phase, build_segmentor, load_segmentor_run
from diffmis.methods.berdiff import BerDiff
from diffmis.methods.hidiff import HiDiff
from diffmis.methods.medsegdiff import GaussianMaskDiffusion
from diffmis.methods.medsegdiff_v2 import MedSegDiffV2
from diffmis.methods.pd_ddpm import PDDPM
from diffmis.methods.segmentor import SegmentorMethod
from diffmis.registry import METHODS

__all__ = ["METHODS", "Method", "Phase", "LossOutput", "build", "build_segmentor", "LEVERS", "lever_value",
           "load_segmentor_run", "SegmentorMethod", "GaussianMaskDiffusion", "MedSegDiffV2", "PDDPM", "BerDiff",
           "HiDiff"]


def build(cfg: Config) -> Method:
    """Build the method a config describes: ``experiment.recipe`` names it in :data:`METHODS` (no weights loaded).

    Raises:
        ConfigError: an unknown recipe, registry name or constructor parameter, or settings the method refuses.
    """
    try:
        cls = METHODS.get(cfg.experiment.recipe)
    except KeyError:
        raise ConfigError(f"experiment.recipe '{cfg.experiment.recipe}' is not a method; registered: "
                          f"{', '.join(METHODS.names())}") from None
    unused = [key for key, default in LEVERS.items()
              if key not in cls.levers and (v := lever_value(cfg, key)) != default and v != "auto"]
    if unused:  # a recipe lever this method does not read would be silently ignored
        raise ConfigError(f"{', '.join(unused)} has no effect on recipe '{cfg.experiment.recipe}' (it reads "
                          f"{', '.join(cls.levers) or 'none of the recipe levers'}); remove the setting")
    return cls.from_config(cfg)


#: the recipe levers (``diffusion.*`` and ``train.*`` keys only some methods read) and their defaults;
#: ``Method.levers`` lists the ones a method reads, :func:`build` refuses the others when set (``auto`` excepted:
#: it means "where it applies")
LEVERS = {"diffusion.x0_seg_weight": 0.0, "diffusion.x0_logits": False, "diffusion.recycle": 0.0,
          "diffusion.train_timesteps": "all", "diffusion.first_step_share": 0.0, "diffusion.prior_noise": 0.0,
          "diffusion.image_seg_weight": 0.0,
          "train.w_diff": 0.1, "train.pretrain_steps": 0, "train.segmentor_every": 1,
          "train.denoiser_from_prior": False}


def lever_value(cfg: Config, key: str) -> Any:
    """The value of a dotted ``section.key`` lever in ``cfg``."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)
