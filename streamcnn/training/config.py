"""Training configuration: typed sections, YAML files, dotted command-line overrides.

A run is described by one :class:`TrainConfig` (sections ``data``, ``model``, ``plan``,
``optim``, ``train`` and the output directory ``out``). The embedded defaults are the
quick CPU run of ``python tools/train.py``; a YAML file (``--config``) overrides some
keys, and ``--set section.key=value`` overrides any key after that. Values on the
command line are parsed as YAML scalars (``1e-3``, ``true``, ``null``, ``[1, 2]``).

Presets are YAML files under ``configs/`` (:data:`PRESETS`); :func:`choose_preset` is the one
function that picks one for a run that names none (the 4000 x 4000 UltraMNIST protocol on CUDA,
the miniature of the embedded defaults elsewhere).

Validation is pydantic's: unknown keys and values of the wrong type or outside a
choice are errors that name the dotted key, so a typo never silently trains the
wrong thing.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["PRESETS", "PRESET_DIR", "preset_path", "choose_preset", "ConfigError", "DataConfig", "ModelConfig", "PlanConfig", "OptimConfig", "LoopConfig",
           "TrainConfig", "load_config", "apply_overrides", "parse_override"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


#: the presets, each ``configs/<name>.yaml``: what the main command runs (see :func:`choose_preset`)
PRESETS = ("miniature", "ultramnist-4000")
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


def choose_preset(requested: str | None, device_type: str) -> str:
    """The preset of a run: ``requested`` if given, else ``ultramnist-4000`` on a CUDA device (the
    benchmark's 4000 x 4000 protocol, what the card is for) and ``miniature`` anywhere else."""
    if requested is not None:
        if requested not in PRESETS:
            raise ConfigError(f"unknown preset {requested!r}: choose one of {', '.join(PRESETS)}")
        return requested
    return "ultramnist-4000" if device_type == "cuda" else "miniature"


def preset_path(name: str) -> Path:
    """``configs/<name>.yaml`` of preset ``name``."""
    path = PRESET_DIR / f"{choose_preset(name, 'cpu')}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset file {path} is missing: reinstall streamcnn from its repository (pip install -e .)")
    return path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where images and labels come from.

    ``kind``: ``manifest`` reads ``root/manifest`` (see :class:`streamcnn.data.ManifestDataset`);
    ``ultramnist`` generates a small UltraMNIST set (``generate_count`` train and
    ``generate_val_count`` test images of ``generate_size`` px) into the cache directory
    once and reuses it, relabelled as ``generate_variant`` (:mod:`streamcnn.data.variants`, balanced;
    ``None``: the generator's own label) and read whole unless ``lazy`` is true (other kinds read
    lazily unless ``lazy`` is false); ``synthetic`` is the in-memory "full resolution matters" task of
    :mod:`streamcnn.training.synthetic` (tests, smoke runs).
    Validation: ``val_root``/``val_manifest`` name a second manifest (``val_root`` defaults
    to ``root``); without one, ``val_fraction`` of the training set is held out.
    """

    kind: Literal["manifest", "ultramnist", "synthetic"] = "ultramnist"
    root: Optional[str] = None
    manifest: str = "manifest.csv"
    val_root: Optional[str] = None
    val_manifest: Optional[str] = None
    # None: 0.2 for a table without split/fold columns (grouped by patient, stratified), else 0
    val_fraction: Optional[float] = Field(None, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)   # held out of training and validation (split.csv)
    fold: Optional[int] = None   # with a fold column: the fold validated on (default: the smallest)
    # per-image augmentation (streamcnn.data.augment); None: flip, rot90 for tables, none otherwise
    augment: Optional[list[str]] = None
    # class: every class drawn equally often; loss: each image's loss weighted by 1 / its class's share
    balance: Literal["none", "class", "loss"] = "none"
    lazy: Optional[bool] = None  # None: lazy readers, except the generated UltraMNIST set (small: read whole)
    # images read whole are kept after their first read; None: when they total <= 2 GiB (8-bit)
    in_memory: Optional[bool] = None
    cache_dir: Optional[str] = None
    generate_count: int = Field(40000, ge=1)
    generate_val_count: int = Field(1400, ge=0)
    generate_size: int = Field(128, ge=64)
    generate_seed: int = 0
    # a relabelling of the generated images (streamcnn.data.variants), class-balanced; None: the sum
    generate_variant: Optional[str] = "smallest"
    synthetic_size: int = Field(256, ge=32)
    synthetic_count: int = Field(64, ge=1)
    # Slides (see docs/pathology.md): pyramid level or microns per pixel, tissue crop, bad files.
    level: Optional[int] = Field(None, ge=0)
    mpp: Optional[float] = Field(None, gt=0)
    tissue: Literal["none", "otsu", "mask"] = "none"
    mask_suffix: str = "_mask"
    on_error: Literal["raise", "skip"] = "raise"
    classes: Optional[list[str]] = None  # class names in label order; default: from the data


class ModelConfig(_Section):
    """The network: ``stream`` (full resolution, streamed trunk), the ``downsample``
    baseline (the image is read at ``input_size`` px and the same trunk runs conventionally),
    or ``patchgd`` (PatchGD with a global patch, :mod:`streamcnn.models.patchgd`: ``patch_size`` px
    patches, ``patch_sampling`` of them updated per inner iteration, ``inner_iterations``), or
    ``zoomin`` (two-stage attention sampling, :mod:`streamcnn.models.zoomin`, its options in
    ``strategy_kwargs``: ``tile``, ``subtile``, ``samples``, ...)."""

    mode: Literal["stream", "downsample", "patchgd", "zoomin"] = "stream"
    trunk: str = "resnet18-sws-w16-s2"
    head: str = "pool"
    trunk_kwargs: dict[str, Any] = Field(default_factory=dict)   # the trunk constructor's (torchvision, timm)
    head_kwargs: dict[str, Any] = Field(default_factory=dict)
    strategy_kwargs: dict[str, Any] = Field(default_factory=dict)   # zoomin mode: ZoomInClassifier's keywords
    weights: Optional[str] = None
    in_channels: Optional[int] = Field(None, ge=1)   # None: the training images' channels
    num_classes: Optional[int] = Field(None, ge=2)   # None: the training data's (dataset.num_classes)
    input_size: int = Field(512, ge=8)
    # downsample mode: "pad" fits the long side to input_size and pads the short side (square
    # batches); "long_side" fits the long side and keeps the short side (batch of one shape).
    input_fit: Literal["pad", "long_side"] = "pad"
    patch_size: Optional[int] = Field(None, ge=8)
    patch_sampling: float = Field(0.25, gt=0, le=1)
    inner_iterations: int = Field(3, ge=1)


class PlanConfig(_Section):
    """Memory: the budget, and the plan choices a config may fix instead of the planner."""

    budget: Optional[str] = None
    #: what the budget limits: "process" (peak RSS on CPU; reserved memory + CUDA context on CUDA)
    #: or "tensors" (the allocator's tensor peak; streamcnn.planning.memory.BUDGET_COUNTS)
    budget_counts: Literal["process", "tensors"] = "process"
    tile_size: Union[int, Literal["auto"], None] = "auto"
    checkpoint: Union[bool, Literal["auto"]] = "auto"
    head_checkpoint: Union[bool, Literal["auto"]] = "auto"
    output_device: Optional[str] = None


class OptimConfig(_Section):
    """Optimizer and learning-rate schedule (per optimizer step).

    ``adamw`` + ``cosine`` (linear warmup for ``warmup_steps``, then cosine to
    ``min_lr_ratio * lr`` over the last ``decay_fraction`` of the remaining steps), or the UltraMNIST paper's ``adam`` + ``exponential``
    (lr multiplied by ``gamma`` every epoch).
    """

    name: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(6e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "exponential", "constant"] = "cosine"
    warmup_steps: int = Field(25, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    # cosine: the share of the steps after warmup that decay (the lr is constant before them)
    decay_fraction: float = Field(0.3, gt=0, le=1)
    gamma: float = Field(0.95, gt=0, le=1)


class LoopConfig(_Section):
    """The training loop: length, batch, precision, reproducibility, device.

    ``epochs``, ``max_steps`` (optimizer steps in total) and ``max_minutes`` (wall clock of
    this invocation, checked after each optimizer step) all end training; the epoch in
    progress is then evaluated and saved. One optimizer step averages
    ``batch_size * accumulate`` images times the number of torchrun processes (each takes a
    batch); the local ``processes`` of one run split each batch between them instead, so the
    optimisation does not depend on how many cores the machine has.
    """

    epochs: int = Field(8, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    max_minutes: Optional[float] = Field(None, gt=0)
    batch_size: int = Field(128, ge=1)
    accumulate: int = Field(1, ge=1)
    # set: accumulate = min(effective_batch, training images) // batch_size (tools/train.py --data: 16)
    effective_batch: Optional[int] = Field(None, ge=1)
    # the metric behind best.pt: auto (val_accuracy, else train_loss) or a metrics.jsonl key
    best_by: str = "auto"
    # auto: bf16 on CUDA compute capability >= 8.0, fp16 + GradScaler on older cards, bf16 on CPUs
    # with native bf16, else off (streamcnn.utils.precision)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # TF32 matmuls and cuDNN convolutions on GPUs that have them (set explicitly, never torch's default)
    tf32: bool = True
    seed: int = 0
    workers: int = Field(0, ge=0)
    # local processes that split each batch (CPU data parallel, spawned; ignored under torchrun). auto:
    # one per core on a CPU when the run has at least 500 optimizer steps, the batch divides evenly and
    # each process fits its share of the budget; else 1
    processes: Union[Literal["auto"], int] = "auto"
    device: str = "auto"
    progress: bool = True
    checkpoint_minutes: float = Field(5.0, gt=0)  # last.pt is also written mid-epoch this often

    @field_validator("processes")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be auto or at least 1")
        return value

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads an unquoted ``off`` as False: ``amp: off`` means "off"."""
        return "off" if value is False else value


class TrainConfig(_Section):
    """A whole training run (see the section classes for each key)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)
    out: Optional[str] = None  # default: runs/<date-time> (a new folder per run)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe(error: ValidationError, source: str) -> ConfigError:
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        # Union members add their type to the location; keep only the config's own key.
        key = ".".join(loc[:2] if loc[0] in TrainConfig.model_fields and loc[0] != "out" else loc[:1])
        if item["type"] == "extra_forbidden":
            problems.setdefault(key, []).append("unknown config key")
        else:
            problems.setdefault(key, []).append(f"{item['msg']} (got {item.get('input')!r})")
    lines = []
    for key, messages in problems.items():
        if messages == ["unknown config key"]:
            section = key.rsplit(".", 1)[0] if "." in key else None
            known = sorted(TrainConfig.model_fields[section].annotation.model_fields) if section else \
                sorted(TrainConfig.model_fields)
            lines.append(f"unknown config key {key!r} (known: {', '.join(known)})")
        else:
            lines.append(f"{key}: " + ", or ".join(messages))
    return ConfigError(f"{source}: " + "; ".join(lines))


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (``["optim", "lr"]``, ``0.001``); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and _NUMBER.match(parsed):
        parsed = float(parsed)  # YAML 1.1 reads "1e-3" as a string
    elif not isinstance(parsed, (str, int, float, bool, list, dict, type(None))):
        parsed = value  # e.g. a date-like string stays a string
    return key.strip().split("."), parsed


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key {'.'.join(path)!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(config: TrainConfig, overrides: Iterable[str | tuple[str, Any]]) -> TrainConfig:
    """A copy of ``config`` with ``section.key=value`` overrides applied and validated."""
    tree = config.to_dict()
    for override in overrides:
        path, value = parse_override(override) if isinstance(override, str) else (override[0].split("."), override[1])
        _set_dotted(tree, path, value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as error:
        raise _describe(error, "command-line override") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str | tuple[str, Any]] = ()) -> TrainConfig:
    """The defaults, updated by the YAML file at ``path`` (if any), then by ``overrides``."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, plan, optim, train, out)")
        try:
            config = TrainConfig.model_validate(tree)
        except ValidationError as error:
            raise _describe(error, str(path)) from None
    return apply_overrides(config, overrides)
