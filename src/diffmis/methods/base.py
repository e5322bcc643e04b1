"""The method interface: what a training loop and a predictor need from a segmentation method, and nothing more.

A *method* is a network (or two), a noise scheduler, its loss terms, the training phases one optimizer step runs,
and its sampler: one paper. Each lives in one file of this package and registers itself in
:data:`diffmis.registry.METHODS` under the name a config gives as ``experiment.recipe``. The trainer and the
predictor use only :class:`Method`:

====================================  ====================================================================
``Method.from_config(cfg)``           build it (registry names in the config pick the networks;
                                      ``diffmis.methods.build(cfg)`` finds the class by ``experiment.recipe``)
``parameter_groups()``                name -> trainable parameters; one optimizer each
``phases(step)``                      the optimizer steps of training iteration ``step``, in order
``ema_module()``                      the sub-module whose weights are averaged (or None)
``loss(image, mask, step, gen)``      :class:`LossOutput` (total + named terms), for one-phase methods and
                                      validation
``sample(image, ...)``                :class:`~diffmis.sampling.SampleOutput`: probabilities and NFE
``segmentor_module()``                the discriminative segmentor inside (HiDiff's prior, PD-DDPM's
                                      pre-segmentation, MedSegDiff-V2's condition model), or None
``setup_training(cfg, log)``          before the first step of a new run (e.g. load ``train.prior_run``)
``check_sampling(steps, ...)``        validate sampler options against this method (ConfigError)
====================================  ====================================================================

Adding a method = one file here with a :class:`Method` subclass decorated ``@METHODS.register("name")``, one
import in ``methods/__init__.py``, its recipe configs, and an entry in ``tests/test_methods.py``'s tiny configs.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from diffmis.checkpoint import load_weights_into, read_state
from diffmis.config import Config
from diffmis.errors import CheckpointError, ConfigError
from diffmis.registry import METHODS, MODELS, SEGMENTORS
from diffmis.sampling import SampleOutput

__all__ = [
    "LossOutput",
    "Phase",
    "Method",
    "register",
    "load_segmentor_run",
    "model_accepts",
    "compose",
    "rand_t",
    "rand_share",
    "chain_t",
    "check_share",
    "check_train_timesteps",
    "randn_like",
    "repeat_members",
    "trainable",
    "build_model",
    "build_segmentor",
    "segmentor_from_config",
]

LossFn = Callable[[Tensor, Tensor, int, Optional[torch.Generator]], "LossOutput"]


# ======================================================================================================
# Results and phases
# ======================================================================================================


@dataclass
class LossOutput:
    """``total``: the scalar to backpropagate; ``terms``: each raw term by name (detached, for logging)."""

    total: Tensor
    terms: dict[str, Tensor]


@dataclass(frozen=True)
class Phase:
    """One optimizer step of a training iteration: ``loss`` is backpropagated into the parameter group ``group``
    (whose optimizer then steps); ``ema``: update the EMA of :meth:`Method.ema_module` after the step."""

    group: str
    loss: LossFn
    ema: bool = False


def compose(raw: dict[str, Tensor], weights: dict[str, float], defaults: dict[str, float]) -> LossOutput:
    """The weighted sum of named loss terms, in one place per method (STYLE 7).

    ``weights`` (``train.loss_weights``) override ``defaults``; a term of weight 0 is logged but not summed.

    Raises:
        ConfigError: every term has weight 0.
    """
    total: Optional[Tensor] = None
    for name, value in raw.items():
        w = float(weights.get(name, defaults.get(name, 1.0)))
        if w != 0.0:
            total = value * w if total is None else total + value * w
    if total is None:
        raise ConfigError(f"every loss term ({', '.join(raw)}) has weight 0 in train.loss_weights")
    return LossOutput(total=total, terms={k: v.detach() for k, v in raw.items()})


def rand_t(n: int, timesteps: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(n,) int64 timesteps uniform in [0, T), drawn from ``generator`` on its own device."""
    t = torch.randint(0, timesteps, (n,), generator=generator, device=generator.device if generator else "cpu")
    return t.to(device)


def rand_share(n: int, share: float, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(n,) bool: each sample selected with probability ``share``, drawn from ``generator`` on its own device (the
    recycled part of a batch, the part trained at the first sampling step)."""
    u = torch.rand(n, generator=generator, device=generator.device if generator else "cpu")
    return (u < share).to(device)


def chain_t(chain: list[int], n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(n,) int64 timesteps drawn uniformly from ``chain`` (the indices a sampler visits): the training timesteps of
    ``diffusion.train_timesteps: sampler``."""
    return torch.tensor(chain, dtype=torch.long, device=device)[rand_t(n, len(chain), generator, device)]


def check_train_timesteps(value: str) -> str:
    """``diffusion.train_timesteps``, refused unless ``"all"`` or ``"sampler"``."""
    if value not in ("all", "sampler"):
        raise ConfigError(f"diffusion.train_timesteps must be 'all' or 'sampler', got {value!r}")
    return value


def check_share(name: str, value: float) -> float:
    """A fraction in [0, 1] (``name`` is its config key), refused otherwise."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a share in [0, 1], got {value!r}")
    return float(value)


def randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` (on its device), moved to ``x``'s."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor in ``obj`` (a tensor, or lists / tuples / dicts of them); the rest as is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def repeat_members(obj: Any, n: int) -> Any:
    """Repeat every tensor in ``obj`` (a tensor, or lists / tuples / dicts of them) ``n`` times along the batch,
    image-major (``repeat_interleave``), the order :func:`diffmis.ensemble.ensemble_predict` expects."""
    return obj if n == 1 else _map_tensors(obj, lambda t: t.repeat_interleave(n, dim=0))


def select_batch(obj: Any, index: Tensor) -> Any:
    """``obj`` (a tensor, or lists / tuples / dicts of them) restricted to the batch entries ``index`` selects."""
    return _map_tensors(obj, lambda t: t[index])


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ======================================================================================================
# The interface
# ======================================================================================================


class Method(nn.Module):
    """Base class of every method (see the module docstring for the interface).

    ``sample(image, members=n)`` returns ``B * n`` samples (image-major): once-per-image work (a prior segmentor,
    a condition encoder) runs on the B images and is repeated, so ensembles do not pay it n times.

    Class attributes:
        name: the registry name (set by :func:`register`).
        samplers: the samplers :meth:`sample` accepts (``sample.sampler`` must be one; the first is the family's
            usual one).
        takes_start_step: :meth:`sample` can start the reverse chain from a noised prior mask (PD-DDPM start).
        own_prior: the method has its own pre-segmentation network for that start.
        levers: the recipe levers (``diffusion.*`` and ``train.*`` keys of ``diffmis.methods.LEVERS``) the method
            reads (others set in a config are refused).
        warm_start_model: the ``model.name`` whose network can start from the segmentor run
            (``train.denoiser_from_prior``, :meth:`start_network_from_segmentor`).
    """

    name: ClassVar[str] = ""
    samplers: ClassVar[tuple[str, ...]] = ("direct",)
    takes_start_step: ClassVar[bool] = False
    own_prior: ClassVar[bool] = False
    supports_members: ClassVar[bool] = True
    #: the recipe levers (dotted keys of ``diffmis.methods.LEVERS``) this method reads
    levers: ClassVar[tuple[str, ...]] = ()
    #: with ``train.denoiser_from_prior`` in :attr:`levers`: the model that can start from the segmentor run
    warm_start_model: ClassVar[str] = ""

    num_classes: int
    default_sampler: str = "direct"
    default_steps: int = 1
    default_start_step: Optional[int] = None
    #: T of the method's diffusion (None: no diffusion)
    timesteps: Optional[int] = None
    #: ``diffusion.train_timesteps``: ``"all"`` (uniform over [0, T)) or ``"sampler"`` (the default chain's only)
    train_timesteps: str = "all"
    #: ``diffusion.first_step_share``: share of a training batch at the default chain's first timestep
    first_step_share: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> "Method":
        raise NotImplementedError

    # ---- training -----------------------------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group; the trainer builds one optimizer per group, in this order."""
        return {"main": trainable(self)}

    def phases(self, step: int) -> list[Phase]:
        """The optimizer steps of training iteration ``step``: by default one step of :meth:`loss` on every
        parameter, followed by an EMA update."""
        return [Phase("main", self.loss, ema=True)]

    def ema_module(self) -> Optional[nn.Module]:
        """The sub-module whose weights are averaged (EMA) during training, or None."""
        return None

    def loss(self, image: Tensor, mask: Tensor, step: int = 0,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        """Training loss of one batch: ``image`` (B, C, H, W), ``mask`` (B, K, H, W) one-hot."""
        raise NotImplementedError

    def forward(self, image: Tensor, mask: Tensor, step: int = 0,
                generator: Optional[torch.Generator] = None) -> LossOutput:  # DDP calls forward
        return self.loss(image, mask, step, generator)

    def segmentor_module(self) -> Optional[nn.Module]:
        """The discriminative segmentor inside the method (it can predict alone), or None."""
        return None

    def setup_training(self, cfg: Config, log: Callable[[str], None] = print) -> None:
        """Before the first step of a new run: load ``train.prior_run`` (a segmentor run) into
        :meth:`segmentor_module`. A resumed run takes every weight from its checkpoint instead."""
        if cfg.train.prior_run:
            seg = self.segmentor_module()
            if seg is None:
                raise ConfigError(f"train.prior_run is set, but recipe '{cfg.experiment.recipe}' has no segmentor "
                                  "to start from a segmentor run")
            ck = load_segmentor_run(seg, cfg.train.prior_run)
            log(f"segmentor initialised from {ck}")
        if "train.denoiser_from_prior" in self.levers:
            self.start_network_from_segmentor(cfg, log)

    def start_network_from_segmentor(self, cfg: Config, log: Callable[[str], None] = print) -> None:
        """``train.denoiser_from_prior`` (``auto``: when a prior run is given): start the trained network
        (:attr:`warm_start_model`, a segmentor widened to read the mask inputs, the same backbone) from the
        segmentor run's weights just loaded into :meth:`segmentor_module`, so that before its first step the
        method returns its segmentor's answer."""
        net = self.step_network()
        want, can = cfg.train.denoiser_from_prior, hasattr(net, "start_from")
        if want == "auto":  # a widened segmentor with a prior run to start from
            want = can and bool(cfg.train.prior_run)
            if can and not want:
                log("denoiser trained from scratch (train.denoiser_from_prior: auto starts it from a "
                    "train.prior_run; none given)")
        if not want:
            return
        if not cfg.train.prior_run:
            raise ConfigError("train.denoiser_from_prior needs train.prior_run (a trained segmentor run to start "
                              "the denoiser from); give --set train.prior_run=RUN or drop denoiser_from_prior")
        if not can:
            raise ConfigError(f"train.denoiser_from_prior needs model.name: {self.warm_start_model} (with "
                              f"model.segmentor's backbone and parameters); got model '{cfg.model.name}'")
        what = "the pre-segmentation network" if self.own_prior else "the segmentor"
        net.start_from(self.segmentor_module(), f"{what} of {cfg.train.prior_run}")
        log(f"denoiser initialised from {what} ({cfg.train.prior_run})")

    # ---- inference ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, image: Tensor, *, steps: Optional[int] = None, sampler: Optional[str] = None,
               eta: float = 0.0, start_step: Optional[int] = None, init: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, members: int = 1) -> SampleOutput:
        """Probabilities (B * members, K, H, W) in [0, 1] for ``image`` (B, C, H, W), image-major, and the NFE.

        Args:
            steps: reverse steps (default :attr:`default_steps`).
            sampler: one of :attr:`samplers` (default :attr:`default_sampler`).
            eta: DDIM stochasticity (Gaussian samplers).
            start_step: PD-DDPM start T' (methods with :attr:`takes_start_step`); 0 = the full chain from noise.
            init: (B, K, H, W) or (B * members, K, H, W) prior mask for that start.
            generator: the only source of randomness.
            members: samples per image.
        """
        raise NotImplementedError

    def step_network(self) -> Optional[nn.Module]:
        """The network :meth:`sample` evaluates once per reverse step (None: no such network, e.g. one direct
        pass). The predictor replays its calls from CUDA graphs on a GPU (``diffmis.cuda_graphs``)."""
        return None

    def size_multiple(self) -> int:
        """H and W of an input must be divisible by this (the deepest downsampling of its networks)."""
        sizes = [getattr(m, "size_multiple", 1) for m in self.modules() if m is not self]
        return math.lcm(1, *(int(s) for s in sizes if isinstance(s, int)))

    def check_geometry(self, cfg: Config) -> None:
        """Raise :class:`ConfigError` naming the key when ``data.image_size`` / ``data.patch_size`` (the sizes the
        networks see in training) are not multiples of :meth:`size_multiple`."""
        m = self.size_multiple()
        for key in ("patch_size", "image_size"):
            size = getattr(cfg.data, key)
            if size is None:
                continue
            if any(v % m for v in size):
                up = [s + (-s) % m for s in size]
                down = [s - s % m for s in size]
                hint = f"{down} or {up}" if all(down) else f"{up}"
                raise ConfigError(
                    f"data.{key}={list(size)} is not a multiple of {m}, which the networks of recipe "
                    f"'{cfg.experiment.recipe}' need (they downsample {m.bit_length() - 1} times); use e.g. {hint}")
            return  # patches (when set) are what the networks see in training

    def sampling_chain(self, steps: int, start_step: Optional[int] = None) -> list[int]:
        """Descending timestep indices that a reverse chain of ``steps`` evaluations (from ``start_step``) visits;
        methods with a diffusion define it."""
        raise NotImplementedError(f"{type(self).__name__} has no diffusion chain")

    def training_timesteps(self, n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
        """(n,) timesteps of a training batch: uniform in [0, T), or (``train_timesteps="sampler"``) uniform over
        the indices the default sampler visits (:meth:`sampling_chain` of the default steps and start step); a
        ``first_step_share`` of them (drawn per sample) at that chain's first index instead."""
        if self.train_timesteps == "all":
            t = rand_t(n, self.timesteps, generator, device)
        else:
            t = chain_t(self.sampling_chain(self.default_steps, self.default_start_step), n, generator, device)
        if self.first_step_share > 0:  # the step that reads the image alone (from pure noise), trained more often
            first = self.sampling_chain(self.default_steps, self.default_start_step)[0]
            t = torch.where(rand_share(n, self.first_step_share, generator, device), torch.full_like(t, first), t)
        return t

    def untrained_timesteps(self, steps: int, start_step: Optional[int] = None) -> list[int]:
        """The timesteps that a chain of ``steps`` evaluations (from ``start_step``) visits and the network never
        trained at: with ``diffusion.train_timesteps: sampler`` it trained only at the default sampler's. [] for a
        network trained at every timestep, or without diffusion."""
        if self.train_timesteps == "all":
            return []
        trained = set(self.sampling_chain(self.default_steps, self.default_start_step))
        return [t for t in self.sampling_chain(steps, start_step) if t not in trained]

    def check_sampling(self, steps: Optional[int] = None, sampler: Optional[str] = None,
                       start_step: Optional[int] = None) -> None:
        """Raise :class:`ConfigError` naming the option when a sampler setting does not fit this method."""
        if sampler is not None and sampler not in self.samplers:
            raise ConfigError(f"sampler {sampler!r} does not fit this {type(self).name} run; use "
                              f"{' or '.join(self.samplers)}")
        if start_step is not None and not self.takes_start_step:
            raise ConfigError(f"a start step (PD-DDPM start) needs a Gaussian diffusion run; this run is "
                              f"{type(self).name}")
        if start_step and self.timesteps is not None and not 1 <= start_step <= self.timesteps:
            raise ConfigError(f"start step {start_step} is outside 1..{self.timesteps} (diffusion.timesteps)")
        if steps is not None and self.timesteps is not None:
            limit = start_step or self.timesteps
            if not 1 <= steps <= limit:
                raise ConfigError(f"steps={steps} is outside 1..{limit} "
                                  f"({'the start step' if start_step else 'diffusion.timesteps'})")


def register(name: str, *aliases: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` in :data:`METHODS` as ``name`` (its ``experiment.recipe``)
    and any ``aliases`` (older recipe names that keep working); sets the class's :attr:`Method.name`."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        for key in (name, *aliases):
            METHODS.register(key)(cls)
        return cls

    return deco


# ======================================================================================================
# Building
# ======================================================================================================


def _dims_kwarg(spatial_dims: int) -> dict[str, int]:
    """``{"spatial_dims": 3}`` for 3D runs; nothing for 2D (a user's 2D-only network need not take it)."""
    return {} if spatial_dims == 2 else {"spatial_dims": spatial_dims}


def build_segmentor(name: str, params: dict[str, Any], in_channels: int, num_classes: int,
                    spatial_dims: int = 2) -> nn.Module:
    """A registered segmentor (of ``spatial_dims`` 2 or 3); an unknown name or parameter is a
    :class:`ConfigError` naming it."""
    import diffmis.models  # noqa: F401  (fills the registries)

    try:
        return SEGMENTORS.build(name, in_channels=in_channels, num_classes=num_classes, **params,
                                **_dims_kwarg(spatial_dims))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"segmentor '{name}': {err}") from None


def segmentor_from_config(cfg: Config, role: str) -> nn.Module:
    """The segmentor ``model.segmentor`` names (a method's prior, pre-segmentation or condition network).

    Raises:
        ConfigError: the config has no ``model.segmentor`` (the message says which ``role`` it plays).
    """
    seg = cfg.model.segmentor
    if seg is None:
        raise ConfigError(f"recipe '{cfg.experiment.recipe}' needs model.segmentor ({role})")
    return build_segmentor(seg.name, dict(seg.params), cfg.data.in_channels, cfg.data.num_classes,
                           cfg.data.spatial_dims)


def build_model(name: str, params: dict[str, Any], spatial_dims: int = 2, **kwargs: Any) -> nn.Module:
    """A registered denoiser (of ``spatial_dims`` 2 or 3); an unknown name or parameter is a
    :class:`ConfigError` naming it."""
    import diffmis.models  # noqa: F401  (fills the registries)

    try:
        return MODELS.build(name, **kwargs, **params, **_dims_kwarg(spatial_dims))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model '{name}': {err}") from None


def model_accepts(name: str, param: str) -> bool:
    """Whether the registered denoiser ``name`` takes the keyword ``param``; an unknown name is a
    :class:`ConfigError` naming it (as in :func:`build_model`)."""
    import inspect

    import diffmis.models  # noqa: F401  (fills the registries)

    try:
        factory = MODELS.get(name)
    except KeyError as err:
        raise ConfigError(f"model '{name}': {err}") from None
    return param in inspect.signature(factory).parameters


def load_segmentor_run(segmentor: nn.Module, run: str | Path) -> Path:
    """Load the segmentor of a ``segmentor`` run folder (``best``, else ``last``) into ``segmentor``.

    Raises:
        CheckpointError: no checkpoint, a run of another recipe, or weights that do not fit (the tensor named).
    """
    from safetensors.torch import load_file

    run = Path(run)
    ck = run / "checkpoints" / ("best" if (run / "checkpoints" / "best").is_dir() else "last")
    if not ck.is_dir():
        raise CheckpointError(f"train.prior_run {run} has no checkpoint (checkpoints/best or checkpoints/last)")
    recipe = ((read_state(ck).get("config") or {}).get("experiment") or {}).get("recipe")
    if recipe not in ("segmentor", None):
        raise CheckpointError(f"train.prior_run {run} is a '{recipe}' run; a segmentor run is needed")
    tensors = load_file(str(ck / "model.safetensors"))
    sub = {k[len("segmentor."):]: v for k, v in tensors.items() if k.startswith("segmentor.")}
    load_weights_into(segmentor, sub, str(ck))
    return ck
