"""Typed, validated configuration.

A config is YAML on disk and a frozen :class:`Config` in memory with one section per concern:
``experiment``, ``data``, ``model``, ``diffusion``, ``train``, ``sample``. Unknown keys and wrong types are
errors (:class:`ConfigError`) that name the key and the file. ``--set a.b=c`` overrides are parsed as YAML
scalars. :func:`dump_config` writes the resolved config so that :func:`load_config` reads it back identically.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from diffmis.errors import ConfigError
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator,
                      model_validator)

__all__ = [
    "ConfigError",
    "Config",
    "ExperimentConfig",
    "DataConfig",
    "AugmentConfig",
    "SyntheticConfig",
    "ComponentConfig",
    "ModelConfig",
    "DiffusionConfig",
    "TrainConfig",
    "SampleConfig",
    "load_config",
    "config_from_dict",
    "dump_config",
    "apply_overrides",
    "compose_config_file",
    "read_yaml",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Size2 = tuple[int, int]
#: a spatial size: (H, W) for 2D runs, (X, Y, Z) in voxel order for 3D runs (``data.spatial_dims``)
SizeN = Union[tuple[int, int], tuple[int, int, int]]


def _as_size(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if isinstance(v, (list, tuple)) and len(v) in (2, 3):
        if any(isinstance(x, int) and not isinstance(x, bool) and x < 1 for x in v):
            raise ValueError(f"sizes must be positive whole numbers of pixels, got {list(v)}")
        return tuple(v)
    return v


class ExperimentConfig(_Section):
    name: str = "experiment"
    # the method: a name registered in diffmis.registry.METHODS (checked when the method is built)
    recipe: str = "medsegdiff"
    seed: int = 0
    output_dir: str = "runs"


class AugmentConfig(_Section):
    flip: bool = False
    rotate90: bool = False
    rotate_degrees: float = Field(0.0, ge=0, le=180)
    affine: bool = False
    scale_range: float = Field(0.0, ge=0, lt=1)
    intensity: float = Field(0.0, ge=0)
    color_jitter: float = Field(0.0, ge=0)
    prob: float = Field(0.5, ge=0, le=1)


class SyntheticConfig(_Section):
    n_train: int = Field(16, ge=1)
    n_val: int = Field(4, ge=1)
    n_test: int = Field(4, ge=1)
    seed: int = 0


class DataConfig(_Section):
    kind: Literal["folder", "nnunet", "mni", "synthetic"] = "folder"
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # 2: images (volumes are read slice by slice along slice_axis); 3: whole volumes, 3D networks, 3D patches
    spatial_dims: Literal[2, 3] = 2
    image_size: Optional[SizeN] = (64, 64)
    patch_size: Optional[SizeN] = None
    # 3D: voxel size (mm, voxel order) every volume is resampled to; None keeps each volume's own grid
    spacing: Optional[tuple[float, float, float]] = None
    # 3D: fraction of training patches centred on a random foreground voxel (the rest: uniform positions)
    foreground_oversample: float = Field(0.33, ge=0, le=1)
    in_channels: int = Field(3, ge=1)
    num_classes: int = Field(1, ge=1)
    labels: Optional[list[int]] = None
    # zscore_nonzero: z-score with the statistics of the non-zero voxels (MRI with a zero background)
    normalize: Literal["minmax", "zscore", "zscore_nonzero", "ct_window", "none"] = "minmax"
    ct_window: Size2 = (-160, 240)
    slice_axis: int = Field(2, ge=0, le=2)
    # held-out fraction of the training ids used as validation when the val split file is missing (0: error)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    augment: AugmentConfig = AugmentConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    num_workers: int = Field(0, ge=0)
    cache: bool = True

    _size = field_validator("image_size", "patch_size", mode="before")(_as_size)

    @model_validator(mode="before")
    @classmethod
    def _sizes_per_axis(cls, data: Any) -> Any:
        """A single number as a size means that many pixels (voxels) along every axis of the run."""
        if isinstance(data, dict) and data.get("spatial_dims") == 3:
            data = dict(data)
            for key in ("image_size", "patch_size"):
                v = data.get(key)
                if isinstance(v, int) and not isinstance(v, bool):
                    data[key] = (v, v, v)
        return data

    @model_validator(mode="after")
    def _check_dims(self) -> "DataConfig":
        n = self.spatial_dims
        for key in ("image_size", "patch_size"):
            v = getattr(self, key)
            if v is not None and len(v) != n:
                raise ValueError(f"data.{key}={list(v)} has {len(v)} entries but data.spatial_dims={n}; give {n} "
                                 f"sizes ({'H, W' if n == 2 else 'X, Y, Z in voxel order'})")
        if n == 3:
            if self.image_size is not None:
                raise ValueError("3D runs keep each volume on its own grid (data.spacing resamples it): set "
                                 "data.image_size: null and train on patches (data.patch_size: [X, Y, Z])")
            if self.patch_size is None:
                raise ValueError("3D runs train on patches: set data.patch_size, e.g. [32, 48, 32]; prediction "
                                 "slides a window of that size over each volume")
            if self.kind == "synthetic":
                raise ValueError("data.kind=synthetic makes 2D images; for a built-in 3D set use data.kind=mni")
        elif self.spacing is not None:
            raise ValueError("data.spacing resamples volumes of 3D runs (data.spatial_dims=3); 2D runs resize "
                             "with data.image_size")
        if self.spacing is not None and any(s <= 0 for s in self.spacing):
            raise ValueError(f"data.spacing must be positive millimetres, got {list(self.spacing)}")
        return self


class ComponentConfig(_Section):
    """A registry name plus the keyword arguments of its constructor."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelConfig(_Section):
    name: str = "medsegdiff"
    params: dict[str, Any] = Field(default_factory=dict)
    segmentor: Optional[ComponentConfig] = None
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class DiffusionConfig(_Section):
    kind: Literal["gaussian", "bernoulli", "none"] = "gaussian"
    timesteps: int = Field(1000, ge=1)
    schedule: Literal["linear", "cosine", "cosine2", "alpha_bar_linear"] = "linear"
    prediction: Literal["eps", "x0", "v"] = "eps"
    mask_range: Literal["pm1", "01"] = "pm1"
    learn_sigma: bool = False
    # HiDiff: add the Bayes flip logits of the prior (BernoulliScheduler.prior_flip_logits) to the refiner's
    # output, so the refiner learns a correction of the segmentor; false = the authors' plain output
    prior_residual: bool = True
    focal_lambda: float = Field(1.0, ge=0)
    focal_gamma: float = Field(2.0, ge=0)
    # Gaussian methods: weight of Dice + BCE on the predicted x0 read as probabilities, added to the MSE
    # (Diff-UNet's recipe; needs prediction x0); 0 = the papers' MSE alone
    x0_seg_weight: float = Field(0.0, ge=0)
    # Gaussian methods with prediction x0: read the network's output as logits of the clean mask, x0_hat =
    # to_range(sigmoid (K = 1) or softmax (K > 1) of the output), and the x0_seg terms as a segmentor's Dice + CE
    # on those logits (Diff-UNet's sigmoid head); false = a linear output clamped to the mask range (its BCE has
    # no gradient where the output leaves the range)
    x0_logits: bool = False
    # Gaussian methods: fraction of each batch whose x_t is noised from a prediction instead of the truth
    # (ImgX-DiffSeg's recycling: the model's own x0 from pure noise; PD-DDPM: its pre-segmentation, t < T';
    # MedSegDiff-V2 with sample.start_step: its anchor, t < T')
    recycle: float = Field(0.0, ge=0, le=1)
    # HiDiff: std of spatially smooth noise added to the segmentor's logits in the refiner step, so the refiner
    # learns from priors that make mistakes (0 = the co-trained segmentor's own prior, as released)
    prior_noise: float = Field(0.0, ge=0)
    # Gaussian and Bernoulli methods: training timesteps uniform over [0, T) ("all", the papers'), or only the ones
    # the default sampler visits (sample.steps over [0, T'), "sampler": the network learns exactly the steps it will
    # take; HiDiff with one Bernoulli-DDIM step: T - 1 alone)
    train_timesteps: Literal["all", "sampler"] = "all"
    # Gaussian methods and BerDiff: share of each training batch put at the default sampler's first timestep (from
    # pure noise: T - 1, where the network reads the image alone and its x0 is a segmentation), the rest drawn as
    # train_timesteps says; 0 = the papers' uniform timesteps
    first_step_share: float = Field(0.0, ge=0, le=1)
    # Gaussian methods whose denoiser has an image encoder (model medsegdiff): weight of Dice + BCE of a
    # segmentation head on the image encoder's last features (deep supervision: the image path learns to locate the
    # structure by itself; the head is unused at sampling); 0 = the papers' (no head)
    image_seg_weight: float = Field(0.0, ge=0)


class TrainConfig(_Section):
    max_steps: int = Field(1000, ge=0)
    # wall-clock budget of the training loop in this invocation (dataset loading and model building excluded); a
    # decaying lr_schedule decays over whichever of max_steps and max_minutes ends the run first (a resumed run's
    # minutes are a new budget: its decay restarts from its steps' share)
    max_minutes: Optional[float] = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "poly"] = "constant"   # after warmup_steps; see max_minutes
    warmup_steps: int = Field(0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    ema_decay: Optional[float] = Field(0.999, ge=0, lt=1)
    # auto: bf16 on CPUs with native bf16 (AMX/AVX512-BF16) and bf16-capable GPUs, fp16 + gradient scaler on
    # older GPUs, fp32 elsewhere (diffmis.hardware); an explicit value always wins
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: on where it measured faster (CPUs running bf16), off elsewhere (diffmis.hardware)
    channels_last: Union[bool, Literal["auto"]] = "auto"
    val_every: int = Field(0, ge=0)
    val_max_batches: Optional[int] = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(0, ge=0)
    loss_weights: dict[str, float] = Field(default_factory=dict)
    # HiDiff alternate-collaborative training (METHODS 5.5)
    w_diff: float = Field(0.1, ge=0)
    pretrain_steps: int = Field(0, ge=0)
    # after pretrain_steps, the segmentor step runs every N-th iteration (the refiner's every iteration); 0: never
    # (the segmentor stays as train.prior_run or the pretraining left it); auto: 0 with a train.prior_run, else 1
    segmentor_every: Union[Literal["auto"], NonNegativeInt] = 1
    # a segmentor run that HiDiff, PD-DDPM and MedSegDiff-V2 start their segmentor from (else it trains in the run)
    prior_run: Optional[str] = None
    # PD-DDPM with model.name: segmentor_denoiser, HiDiff with segmentor_refiner: the denoiser starts from
    # train.prior_run's weights (the mask channels of the first convolution at zero) instead of from scratch;
    # auto: where a train.prior_run is given and the denoiser is a segmentor
    denoiser_from_prior: Union[bool, Literal["auto"]] = False
    # after training, fit the probability temperature on the data.val_split images and write RUN/calibration.json,
    # which predictions apply (2D runs; volumes: diffmis calibrate on the files). Done by diffmis train and the
    # quickstart; from Python, diffmis.inference.calibrate_split(run) after diffmis.training.train(cfg)
    calibrate: bool = False
    progress: bool = True


class SampleConfig(_Section):
    sampler: Literal["ddpm", "ddim", "bernoulli", "bernoulli_ddim", "direct"] = "ddim"
    steps: int = Field(10, ge=1)
    eta: float = Field(0.0, ge=0)
    ensemble: int = Field(1, ge=1)
    fuse: Literal["mean", "staple", "mean_squared"] = "mean"
    threshold: float = Field(0.5, gt=0, lt=1)
    # temperature of the fused probability (diffmis.calibration; never moves a label); a run's calibration.json,
    # written by diffmis calibrate, takes precedence
    temperature: float = Field(1.0, gt=0)
    start_step: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    use_ema: bool = True


class Config(_Section):
    experiment: ExperimentConfig = ExperimentConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> "Config":
        d = self.diffusion
        if d.kind == "bernoulli" and d.schedule == "linear" and d.timesteps < 1000:
            # beta_t = linspace(s*1e-4, s*0.02, T) with s = 1000/T exceeds 1 for small T (METHODS 5.3.5)
            s = 1000.0 / d.timesteps
            if s * 0.02 >= 1.0:
                raise ValueError(
                    f"diffusion.schedule='linear' is invalid for timesteps={d.timesteps}: its betas reach "
                    f"{s * 0.02:.2f} >= 1; use 'cosine', 'cosine2' or 'alpha_bar_linear'"
                )
        if self.train.calibrate and self.data.spatial_dims == 3:
            raise ValueError("train.calibrate fits on 2D runs' val images; for a 3D run, fit after training on "
                             "held-out volumes: diffmis calibrate --run RUN --input IMAGES --masks LABELS")
        if self.sample.start_step is not None and self.sample.start_step > d.timesteps:
            raise ValueError(
                f"sample.start_step={self.sample.start_step} exceeds diffusion.timesteps={d.timesteps}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python nested dict (lists instead of tuples), suitable for YAML/JSON."""
        return _plain(self.model_dump(mode="python"))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}'")
        else:
            lines.append(f"'{loc}': {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {source}: " + "; ".join(lines)


def config_from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a nested dict into a :class:`Config`; raise :class:`ConfigError` naming key and source."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override '{item}': the key must name a section and a field, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': value is not valid YAML ({err})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for p in path[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
                node[p] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node = nxt
        node[path[-1]] = value
    return out


#: the recipes shipped with the package (``configs/`` at the repository top links here)
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"


def builtin_configs() -> list[str]:
    """Names of the shipped recipes (``<recipe>_<dataset>``), usable wherever a config path is (their building
    blocks live in ``configs/base/``)."""
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: Union[str, Path]) -> Path:
    """A config file path, or the name of a shipped config (``hidiff_kvasir`` or ``hidiff_kvasir.yaml``).

    Raises:
        ConfigError: neither a file nor a shipped config (the message lists the shipped names).
    """
    p = Path(path)
    if p.is_file():
        return p
    if len(p.parts) == 1 or (len(p.parts) == 2 and p.parts[0] == "configs"):
        cand = BUILTIN_CONFIGS / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {p} (or name a shipped config: {', '.join(builtin_configs())})")


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (not the last one winning)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is written twice (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML config file as a dict (its ``base`` key not yet resolved).

    Raises:
        ConfigError: unreadable file, invalid YAML, a duplicate key (with its line), an empty file, or a top level
            that is not a mapping.
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if loaded is None:
        raise ConfigError(f"config file {path} is empty; name a shipped config ({', '.join(builtin_configs())}) "
                          "or write its sections (experiment, data, model, diffusion, train, sample)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping")
    return loaded


def compose_config_file(path: Union[str, Path], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file with its bases: ``base: NAME`` or ``base: [NAME, ...]`` (a path relative to the file, without
    ``.yaml``, e.g. ``base/hidiff``) are read first, in order, and the file's own keys are merged on top.

    Merging is per key; a component (``model``, ``model.segmentor``) whose ``name`` changes takes the new
    ``params`` whole, otherwise ``params`` merge key by key.

    Raises:
        ConfigError: a missing base (named with the file that asks for it), a cycle of bases, or a bad file.
    """
    p = resolve_config_path(path)
    if p.resolve() in _seen:
        raise ConfigError(f"config bases form a cycle: {' -> '.join(str(x) for x in (*_seen, p.resolve()))}")
    data = read_yaml(p)
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"invalid config {p}: 'base' must name a file or list files, got {bases!r}")
    merged: dict[str, Any] = {}
    for name in bases:
        cand = p.parent / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if not cand.is_file():
            raise ConfigError(f"config {p}: its base '{name}' does not exist ({cand})")
        merged = _deep_merge(merged, compose_config_file(cand, (*_seen, p.resolve())))
    return _deep_merge(merged, data)


def load_config(
    path: Union[str, Path, None] = None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None
) -> Config:
    """Load a YAML config file (with its bases; or start from ``base``/defaults), apply overrides, validate.

    Raises:
        ConfigError: the file is missing, empty or not valid YAML, a key is unknown or written twice, or a value
            has the wrong type.
    """
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    source = "<defaults>"
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        data = _deep_merge(data, compose_config_file(p))
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with --set overrides)"
    return config_from_dict(data, source)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` merged into a copy of ``a``, key by key; where ``b`` renames a component (``name`` differs), its
    ``params`` replace ``a``'s instead of merging into them."""
    out = copy.deepcopy(a)
    renamed = "name" in b and "name" in out and b["name"] != out["name"]
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not (k == "params" and renamed):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def dump_config(cfg: Config, path: Union[str, Path, None] = None) -> str:
    """Serialise the resolved config to YAML (and write it to ``path`` if given). Reloads identically."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
