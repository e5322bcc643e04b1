"""Pixel-side networks (layer 3): segmentors and diffusion denoisers, all registered by name.

Importing this package registers every denoiser in :data:`diffmis.registry.MODELS` ("conditional_unet",
"medsegdiff", "medsegdiff_v2", "bbdm", "segmentor_denoiser", "segmentor_refiner") and every segmentor in
:data:`diffmis.registry.SEGMENTORS` ("unet", "attention_unet", "segresnet"). Models never see noise schedules:
timesteps enter only through embeddings ("segmentor_denoiser" and "segmentor_refiner" take none).
"""

from diffmis.models.conditional_unet import ConditionalUNet
from diffmis.models.hidiff import BBDMDenoiser
from diffmis.models.medsegdiff import MedSegDiff
from diffmis.models.medsegdiff_v2 import MedSegDiffV2
from diffmis.models.segmentor_denoiser import SegmentorDenoiser, SegmentorRefiner
from diffmis.models.segmentors import Segmentor, SegmentorOutput

__all__ = ["ConditionalUNet", "MedSegDiff", "MedSegDiffV2", "BBDMDenoiser", "SegmentorDenoiser", "SegmentorRefiner",
           "Segmentor", "SegmentorOutput"]
