"""Methods: a model + a scheduler = a segmentation method with ``loss`` and ``sample``.

=====================  ===========================================================================
recipe                 what it is
=====================  ===========================================================================
``segmentor``          a discriminative segmentor alone (Dice + CE); the baseline and the prior
``conditional_unet``   Gaussian DDPM with the image concatenated to x_t (Wolleb / SegDiff)
``medsegdiff``         Gaussian DDPM with the MedSegDiff denoiser (DCE + FF-Parser)
``medsegdiff_v2``      Gaussian DDPM with a condition segmentor (U-SA anchor + SS-Former) + anchor loss
``pd_ddpm``            any Gaussian denoiser + a pre-segmentation segmentor; sampling starts at T' < T
``hidiff``             a segmentor prior + the BBDM refiner (Bernoulli diffusion), alternate training
=====================  ===========================================================================

Loss terms are composed here, once per method, with weights from ``train.loss_weights``; the trainer
calls ``total.backward()`` and logs ``terms`` by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from diffmis.config import Config
from diffmis.errors import ConfigError
from diffmis.losses import probabilities, segmentation_loss_terms
from diffmis.registry import MODELS, SEGMENTORS
from diffmis.sampling import SampleOutput, bernoulli_sample, gaussian_sample
from diffmis.schedulers import BernoulliScheduler, GaussianScheduler

__all__ = [
    "LossOutput",
    "SegmentationMethod",
    "SegmentorMethod",
    "GaussianMethod",
    "HiDiffMethod",
    "build",
    "build_segmentor",
]


@dataclass
class LossOutput:
    """``total``: the scalar to backpropagate; ``terms``: each weighted term by name (detached for logging)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def _compose(raw: dict[str, torch.Tensor], weights: dict[str, float], defaults: dict[str, float]) -> LossOutput:
    """Weighted sum of named loss terms; ``weights`` (train.loss_weights) override ``defaults``."""
    total = None
    terms: dict[str, torch.Tensor] = {}
    for name, value in raw.items():
        w = float(weights.get(name, defaults.get(name, 1.0)))
        terms[name] = value.detach()
        if w == 0.0:
            continue
        total = value * w if total is None else total + value * w
    assert total is not None, "every loss term has weight 0"
    return LossOutput(total=total, terms=terms)


def _rand_t(n: int, timesteps: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    t = torch.randint(0, timesteps, (n,), generator=generator, device=generator.device if generator else "cpu")
    return t.to(device)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def repeat_members(obj: Any, n: int) -> Any:
    """Repeat every tensor in ``obj`` (a tensor, or lists / tuples / dicts of them) ``n`` times along the batch,
    image-major (``repeat_interleave``), the order :func:`diffmis.ensemble.ensemble_predict` expects."""
    if n == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.repeat_interleave(n, dim=0)
    if isinstance(obj, dict):
        return {k: repeat_members(v, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(repeat_members(v, n) for v in obj)
    return obj


class SegmentationMethod(nn.Module):
    """Base class: ``loss(image, mask, step)`` for training and ``sample(image, ...)`` for inference.

    ``sample(image, members=n)`` returns ``B * n`` samples (image-major): once-per-image work runs on the B
    images and is repeated, so ensembles do not pay it n times."""

    recipe: str = ""
    num_classes: int
    supports_members: bool = True
    #: sampler and steps used when ``sample`` is called without them
    default_sampler: str = "direct"

    def ema_module(self) -> Optional[nn.Module]:
        """The sub-module whose weights are averaged (EMA) during training, or None."""
        return None

    def loss(self, image: torch.Tensor, mask: torch.Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        raise NotImplementedError

    def forward(self, image: torch.Tensor, mask: torch.Tensor, step: int = 0,
                generator: Optional[torch.Generator] = None) -> LossOutput:  # DDP calls forward
        return self.loss(image, mask, step, generator)

    @torch.no_grad()
    def sample(self, image: torch.Tensor, **kwargs: Any) -> SampleOutput:
        raise NotImplementedError


def build_segmentor(name: str, params: dict[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    try:
        return SEGMENTORS.build(name, in_channels=in_channels, num_classes=num_classes, **params)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"segmentor '{name}': {err}") from None


# ----------------------------------------------------------------------------------------------------------
# segmentor alone
# ----------------------------------------------------------------------------------------------------------


class SegmentorMethod(SegmentationMethod):
    """A discriminative segmentor trained with Dice + CE; ``sample`` returns its probabilities (NFE 1)."""

    recipe = "segmentor"

    def __init__(self, segmentor: nn.Module, num_classes: int, loss_weights: dict[str, float]) -> None:
        super().__init__()
        self.segmentor = segmentor
        self.num_classes = num_classes
        self.loss_weights = dict(loss_weights)

    def loss(self, image, mask, step=0, generator=None) -> LossOutput:
        out = self.segmentor(image)
        return _compose(segmentation_loss_terms(out.logits, mask), self.loss_weights, {"dice": 1.0, "ce": 1.0})

    @torch.no_grad()
    def sample(self, image: torch.Tensor, *, members: int = 1, **kwargs: Any) -> SampleOutput:
        """Probabilities (B * members, K, H, W) in [0, 1]; extra sampler arguments are ignored (one forward
        pass; the members are identical)."""
        logits = self.segmentor(image).logits.float()
        return SampleOutput(probs=repeat_members(probabilities(logits), members), nfe=1)


# ----------------------------------------------------------------------------------------------------------
# Gaussian diffusion (conditional UNet, MedSegDiff, MedSegDiff-V2, PD-DDPM)
# ----------------------------------------------------------------------------------------------------------


class GaussianMethod(SegmentationMethod):
    """Gaussian DDPM on the mask with any registered denoiser (METHODS 1.2).

    With ``prior`` (a segmentor) the method is PD-DDPM: sampling may start from the noised pre-segmentation at
    ``start_step`` T' (METHODS 4.2). For MedSegDiff-V2 the anchor loss on the condition segmentor is added
    (Dice + beta * CE on the samples whose t is a multiple of alpha, METHODS 3.2).
    """

    default_sampler = "ddim"

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler: GaussianScheduler,
        num_classes: int,
        loss_weights: dict[str, float],
        *,
        recipe: str = "medsegdiff",
        prior: Optional[nn.Module] = None,
        prior_trainable: bool = True,
        anchor_alpha: int = 5,
        anchor_beta: float = 10.0,
        default_steps: int = 10,
        default_sampler: str = "ddim",
        default_start_step: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.num_classes = num_classes
        self.loss_weights = dict(loss_weights)
        self.recipe = recipe
        self.prior = prior
        self.prior_trainable = prior_trainable
        if prior is not None and not prior_trainable:
            for p in prior.parameters():
                p.requires_grad_(False)
        self.anchor_alpha = anchor_alpha
        self.anchor_beta = anchor_beta
        self.default_steps = default_steps
        self.default_sampler = default_sampler
        self.default_start_step = default_start_step

    def ema_module(self) -> nn.Module:
        return self.denoiser

    def loss(self, image, mask, step=0, generator=None) -> LossOutput:
        b = image.shape[0]
        x0 = self.scheduler.mask_to_x0(mask)
        t = _rand_t(b, self.scheduler.timesteps, generator, image.device)
        noise = _randn_like(x0, generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        cond = self.denoiser.condition(image)
        pred = self.denoiser(x_t, t, cond).float()
        target = self.scheduler.training_target(x0, noise, t)
        raw: dict[str, torch.Tensor] = {"diffusion": torch.mean((pred - target) ** 2)}
        defaults = {"diffusion": 1.0}
        if "anchor_logits" in cond:  # MedSegDiff-V2: L = L_noise + 1[t mod alpha = 0] (Dice + beta CE)
            sel = (t % self.anchor_alpha) == 0
            logits = cond["anchor_logits"].float()
            if bool(sel.any()):
                terms = segmentation_loss_terms(logits[sel], mask[sel])
                raw["anchor"] = terms["dice"] + self.anchor_beta * terms["ce"]
            else:  # keep every parameter in the graph (DDP) with an exact zero
                raw["anchor"] = logits.sum() * 0.0
        if self.prior is not None and self.prior_trainable:  # PD-DDPM: the pre-segmentation net trains alongside
            seg = segmentation_loss_terms(self.prior(image).logits, mask)
            raw["prior"] = seg["dice"] + seg["ce"]
        return _compose(raw, self.loss_weights, defaults)

    @torch.no_grad()
    def prior_probs(self, image: torch.Tensor) -> torch.Tensor:
        if self.prior is None:
            raise ConfigError("this method has no pre-segmentation segmentor (PD-DDPM prior)")
        return probabilities(self.prior(image).logits.float())

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        *,
        steps: Optional[int] = None,
        sampler: Optional[Literal["ddim", "ddpm"]] = None,
        eta: float = 0.0,
        init: Optional[torch.Tensor] = None,
        start_step: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        members: int = 1,
        **_: Any,
    ) -> SampleOutput:
        """Sample ``members`` masks per image for ``image`` (B, C, H, W) (B * members samples, image-major).

        Args:
            steps: reverse steps (over [0, T) or over [0, T') with a PD-DDPM start).
            init: (B, K, H, W) or (B * members, K, H, W) prior mask in [0, 1] for the PD-DDPM start; taken from
                the method's own prior segmentor (thresholded, once per image) when None and a start step is set.
            start_step: T' in 1..T; 0 = the full chain from pure noise; None uses the method default (pure noise
                when that is None too).
        Returns:
            SampleOutput with probabilities (B, K, H, W) in [0, 1] and the NFE (prior pass counted).
        """
        start = start_step if start_step is not None else self.default_start_step
        if start == 0:  # explicit request for the full chain from pure noise
            start, init = None, None
        extra_nfe = 0
        if start is not None and init is None:
            p = self.prior_probs(image)
            extra_nfe = 1
            init = (p > 0.5).float() if p.shape[1] == 1 else torch.nn.functional.one_hot(
                p.argmax(1), p.shape[1]).permute(0, 3, 1, 2).float()
        if init is not None and init.shape[0] == image.shape[0]:
            init = repeat_members(init, members)
        cond = repeat_members(self.denoiser.condition(image), members)  # V2: its segmentor once per image
        shape = (image.shape[0] * members, self.num_classes, *image.shape[2:])

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x_t, t, cond).float()

        out = gaussian_sample(
            model_fn, self.scheduler, shape, steps=steps or self.default_steps,
            sampler=sampler or self.default_sampler, eta=eta, init=init,
            start_step=start if init is not None else None, generator=generator,
            device=image.device,
        )
        out.nfe += extra_nfe
        return out


# ----------------------------------------------------------------------------------------------------------
# HiDiff: segmentor prior + BBDM refiner (METHODS 5)
# ----------------------------------------------------------------------------------------------------------


class HiDiffMethod(SegmentationMethod):
    """HiDiff: a segmentor S gives the prior p; the BBDM refiner R denoises a Bernoulli chain whose
    stationary law is B(p). Training alternates a refiner step and a segmentor step (METHODS 5.5)."""

    recipe = "hidiff"
    default_sampler = "bernoulli_ddim"

    def __init__(
        self,
        segmentor: nn.Module,
        refiner: nn.Module,
        scheduler: BernoulliScheduler,
        num_classes: int,
        loss_weights: dict[str, float],
        *,
        w_diff: float = 0.1,
        focal_lambda: float = 1.0,
        prior_residual: bool = True,
        default_steps: Optional[int] = None,
        default_sampler: str = "bernoulli_ddim",
    ) -> None:
        super().__init__()
        self.segmentor = segmentor
        self.refiner = refiner
        self.scheduler = scheduler
        self.num_classes = num_classes
        self.loss_weights = dict(loss_weights)
        self.w_diff = w_diff
        self.focal_lambda = focal_lambda
        self.prior_residual = prior_residual
        self.default_steps = default_steps or scheduler.timesteps
        self.default_sampler = default_sampler

    def ema_module(self) -> nn.Module:
        return self.refiner

    def flip_logits(self, y_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """Refiner output (B, K, H, W) flip logits, plus the prior's Bayes flip logits when ``prior_residual``."""
        logits = self.refiner(y_t, t, cond).float()
        if self.prior_residual:
            logits = logits + self.scheduler.prior_flip_logits(y_t, cond["prior"].float(), t)
        return logits

    def _bbdm_terms(self, image, mask, prior, features, generator) -> dict[str, torch.Tensor]:
        b = image.shape[0]
        t = _rand_t(b, self.scheduler.timesteps, generator, image.device)
        y_t = self.scheduler.q_sample(mask, prior, t, generator=generator)
        logits = self.flip_logits(y_t, t, {"image": image, "prior": prior, "features": features})
        return self.scheduler.loss(logits, mask, y_t, prior.float(), t)

    def refiner_loss(self, image, mask, step=0, generator=None) -> LossOutput:
        """Refiner step (METHODS 5.5 step 1): prior and features from S, detached; KL + lambda * focal."""
        with torch.no_grad():
            out = self.segmentor(image)
            prior = probabilities(out.logits.float())
            feats = [f.detach() for f in out.features]
        terms = self._bbdm_terms(image, mask, prior, feats, generator)
        return _compose(terms, self.loss_weights, {"kl": 1.0, "focal": self.focal_lambda})

    def segmentor_loss(self, image, mask, step=0, generator=None, with_bbdm: bool = True) -> LossOutput:
        """Segmentor step (METHODS 5.5 step 2): L_S + w_diff * L_BBDM with gradients through p and features.

        ``with_bbdm=False`` (segmentor pre-training) gives L_S alone."""
        out = self.segmentor(image)
        raw = segmentation_loss_terms(out.logits, mask)
        if self.w_diff > 0 and with_bbdm:
            prior = probabilities(out.logits.float())
            bb = self._bbdm_terms(image, mask, prior, list(out.features), generator)
            raw["bbdm"] = bb["kl"] + self.focal_lambda * bb["focal"]
        return _compose(raw, self.loss_weights, {"dice": 1.0, "ce": 1.0, "bbdm": self.w_diff})

    def loss(self, image, mask, step=0, generator=None) -> LossOutput:
        """Both losses summed (used only for validation loss logging; training alternates the two)."""
        a = self.refiner_loss(image, mask, step, generator)
        b = self.segmentor_loss(image, mask, step, generator)
        return LossOutput(a.total + b.total, {**a.terms, **{f"seg_{k}": v for k, v in b.terms.items()}})

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        *,
        steps: Optional[int] = None,
        sampler: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
        members: int = 1,
        **_: Any,
    ) -> SampleOutput:
        """Refined probabilities (B * members, K, H, W) in [0, 1], image-major; the segmentor runs once per image
        (its prior and features are repeated for the members); NFE counts that pass."""
        out = self.segmentor(image)
        prior = probabilities(out.logits.float())
        cond = repeat_members({"image": image, "prior": prior, "features": list(out.features)}, members)
        prior = cond["prior"]

        def model_fn(y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.flip_logits(y_t, t, cond)

        s = sampler or self.default_sampler
        if s not in ("bernoulli", "bernoulli_ddim"):
            s = self.default_sampler
        res = bernoulli_sample(model_fn, self.scheduler, prior, steps=steps or self.default_steps,
                               sampler=s, generator=generator)
        res.nfe += 1
        return res

    @torch.no_grad()
    def prior_probs(self, image: torch.Tensor) -> torch.Tensor:
        return probabilities(self.segmentor(image).logits.float())


# ----------------------------------------------------------------------------------------------------------
# builder
# ----------------------------------------------------------------------------------------------------------

_GAUSSIAN_RECIPES = {"conditional_unet", "medsegdiff", "medsegdiff_v2", "pd_ddpm"}


def _build_model(name: str, params: dict[str, Any], **kwargs: Any) -> nn.Module:
    try:
        return MODELS.build(name, **kwargs, **params)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model '{name}': {err}") from None


def build(cfg: Config) -> SegmentationMethod:
    """Build the method a config describes (registry names pick the classes; no weights are loaded).

    Raises:
        ConfigError: an unknown registry name or constructor parameter, or a recipe/diffusion mismatch.
    """
    import diffmis.models  # noqa: F401  (fills the registries)

    recipe = cfg.experiment.recipe
    c_in, k = cfg.data.in_channels, cfg.data.num_classes
    weights = dict(cfg.train.loss_weights)
    seg_cfg = cfg.model.segmentor

    if recipe == "segmentor":
        name, params = (seg_cfg.name, seg_cfg.params) if seg_cfg else (cfg.model.name, cfg.model.params)
        return SegmentorMethod(build_segmentor(name, dict(params), c_in, k), k, weights)

    if recipe in _GAUSSIAN_RECIPES:
        if cfg.diffusion.kind != "gaussian":
            raise ConfigError(f"recipe '{recipe}' needs diffusion.kind='gaussian', got '{cfg.diffusion.kind}'")
        if cfg.diffusion.learn_sigma:
            raise ConfigError("diffusion.learn_sigma=true (the learned-variance VLB term) is not implemented yet; "
                              "use the default false")
        sched = GaussianScheduler(cfg.diffusion.timesteps, cfg.diffusion.schedule, cfg.diffusion.prediction,
                                  cfg.diffusion.mask_range)
        params = dict(cfg.model.params)
        anchor_alpha = int(params.pop("anchor_alpha", 5))
        anchor_beta = float(params.pop("anchor_beta", 10.0))
        kwargs: dict[str, Any] = {"in_channels": c_in, "num_classes": k}
        if recipe == "medsegdiff_v2" or cfg.model.name == "medsegdiff_v2":
            if seg_cfg is None:
                raise ConfigError("recipe 'medsegdiff_v2' needs model.segmentor (the condition model)")
            kwargs["segmentor"] = build_segmentor(seg_cfg.name, dict(seg_cfg.params), c_in, k)
        denoiser = _build_model(cfg.model.name, params, **kwargs)
        prior = None
        if recipe == "pd_ddpm":
            if seg_cfg is None:
                raise ConfigError("recipe 'pd_ddpm' needs model.segmentor (the pre-segmentation network)")
            prior = build_segmentor(seg_cfg.name, dict(seg_cfg.params), c_in, k)
        sampler = cfg.sample.sampler if cfg.sample.sampler in ("ddim", "ddpm") else "ddim"
        return GaussianMethod(
            denoiser, sched, k, weights, recipe=recipe, prior=prior,
            prior_trainable=cfg.train.prior_run is None,
            anchor_alpha=anchor_alpha, anchor_beta=anchor_beta, default_steps=cfg.sample.steps,
            default_sampler=sampler,
            default_start_step=cfg.sample.start_step if recipe == "pd_ddpm" else None,
        )

    if recipe == "hidiff":
        if cfg.diffusion.kind != "bernoulli":
            raise ConfigError(f"recipe 'hidiff' needs diffusion.kind='bernoulli', got '{cfg.diffusion.kind}'")
        if seg_cfg is None:
            raise ConfigError("recipe 'hidiff' needs model.segmentor (the prior segmentor)")
        seg = build_segmentor(seg_cfg.name, dict(seg_cfg.params), c_in, k)
        refiner = _build_model(cfg.model.name, dict(cfg.model.params), in_channels=c_in, num_classes=k,
                               segmentor_channels=list(seg.feature_channels))
        sched = BernoulliScheduler(cfg.diffusion.timesteps, cfg.diffusion.schedule,
                                   focal_gamma=cfg.diffusion.focal_gamma)
        sampler = cfg.sample.sampler if cfg.sample.sampler in ("bernoulli", "bernoulli_ddim") else "bernoulli_ddim"
        return HiDiffMethod(seg, refiner, sched, k, weights, w_diff=cfg.train.w_diff,
                            focal_lambda=cfg.diffusion.focal_lambda, prior_residual=cfg.diffusion.prior_residual,
                            default_steps=min(cfg.sample.steps, cfg.diffusion.timesteps), default_sampler=sampler)

    raise ConfigError(f"unknown recipe '{recipe}'")
