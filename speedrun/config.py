"""Typed recipes: frozen dataclasses, TOML files and checked ``section.key=value`` overrides.

A recipe is everything that decides how a run trains, in plain values. Hyperparameters
are stated in units that survive a change of batch size: the LR is given for a reference batch
(``optim.lr`` at ``optim.lr_batch_size`` examples) and scaled linearly to the batch trained with.

>>> r = Recipe().override({"train.batch_size": "512", "optim.lr": "2.0"})
>>> r.train.batch_size, r.optim.lr
(512, 2.0)
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping


class ConfigError(ValueError):
    """A recipe, override or option that cannot be used; the message is meant for the user."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "fashion-mnist"  # a built-in dataset name or a path
    flip: bool = True  # random horizontal flip per image
    alternating_flip: bool = False  # with flip: each image flipped in alternate epochs (airbench)
    translate_px: int = 0  # random shift of up to this many pixels (reflect padding)
    cutout_px: int = 0  # zero a random square of this side per image (DeVries & Taylor 2017)
    # Progressive resizing (fast.ai, Composer): train at resize_start_scale x the native size, growing
    # linearly to full size, which is reached for the last resize_full_frac of training. 1.0: off.
    resize_start_scale: float = 1.0
    resize_full_frac: float = 0.25
    # Image-folder trees only: decode images to at most this side (0: the source's default, 64 px). The
    # whole set sits on the device, so this decides memory: ImageNet's 1.28M images take 63 GB at 128 px.
    max_size: int = 0
    # Image-folder trees only: "square" caches every image at one size (shorter side, then centre crop);
    # "aspect" keeps each image's aspect ratio with its shorter side capped at max_size, and the loader
    # crops each batch from the whole stored pictures (random-resized crops when training, resize then
    # centre crop when evaluating) to crop_size px (0: the cache's most common shorter side).
    layout: Literal["square", "aspect"] = "square"
    crop_size: int = 0
    # With progressive resizing: batch size x (native / size)^2 (at most 4x) at smaller sizes, and the
    # LR scaled by the same factor (linear scaling rule), as fast.ai's ImageNet runs did.
    resize_scale_batch: bool = False
    # Random-resized crop (Inception): a random box per image, of area fraction in rrc_scale = (lo, hi)
    # and aspect ratio w/h in rrc_ratio, resized to the current size. Empty rrc_scale: off.
    rrc_scale: tuple[float, ...] = ()
    rrc_ratio: tuple[float, ...] = (0.75, 4 / 3)
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019): a batch is mixed with probability
    # mix_prob, with lambda ~ Beta(alpha, alpha); with both alphas > 0, each mixed batch uses one
    # of the two at even odds. 0: off.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    # resident: the uint8 set lives on the device; stream: it stays memory-mapped on the host and batches
    # are read ahead by a thread; auto: resident when it takes at most half the device's free memory.
    # decode (layout=aspect): nothing is cached but the list of files; the JPEGs are decoded as batches
    # are read, in a pool of decode_workers threads (0: every core), for sets too large to cache.
    loader: Literal["auto", "resident", "stream", "decode"] = "auto"
    decode_workers: int = 0
    # Hold this fraction of the training split out as a validation split (stratified, the same images
    # for every seed: speedrun.data.split); it then trains on the rest. 0: no validation split.
    val_frac: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "convnet"
    widths: tuple[int, ...] = (32, 64, 64, 128, 128)  # output channels of each 3x3 conv
    pools: tuple[int, ...] = (0, 1, 3)  # indices of the convs followed by a 2x2 max-pool
    activation: Literal["relu", "gelu", "celu", "silu", "hardswish"] = "gelu"
    dropout: float = 0.0
    logit_scale: float = 1.0  # multiplies the logits (airbench uses 1/9)
    # Normalization options, applied to every BatchNorm after the model is built
    # (speedrun.techniques.normalization.apply_norm_options):
    zero_init_residual: bool = False  # γ = 0 in each BN that ends a residual branch (the model marks them)
    bn_momentum: float | None = None  # PyTorch convention (weight of the new batch); None: as built (0.1)
    bn_frozen_scale: bool = False  # γ fixed at its initial 1, not trained (airbench)
    # The first layer, per model: "conv" its own (airbench: a trainable stem_kernel square conv; resnet50:
    # 7x7/2 conv + max-pool); "whiten" (airbench; convnet: its first 3x3 conv, widths[0] channels) that
    # conv set by patch whitening and frozen; "small" (resnet50) a 3x3/1 conv without pooling, for
    # CIFAR-size images.
    stem: Literal["conv", "whiten", "small"] = "conv"
    stem_kernel: int = 2  # airbench: side of the stem conv's square kernel
    whiten_eps: float = 5e-4  # stem=whiten: added to each patch-covariance eigenvalue before 1/sqrt
    # Fraction of the schedule during which the first layer's trainable parameters (a whitening stem's
    # bias or the BatchNorm after it; a trainable stem conv too) train; then they freeze, and the
    # backward stops before the second layer (airbench: after 3 of ~10 epochs). 0: frozen from the
    # start, 1: never frozen. See speedrun.techniques.freezing.
    stem_train_frac: float = 1.0
    # FreezeOut (Brock et al. 2017): entry i is the fraction of the schedule during which the model's
    # i-th block after the stem (airbench: conv group; convnet: conv layer; resnet: stage) trains; then
    # its parameters freeze, and once every block before a layer is frozen the backward stops at that
    # layer. Blocks without an entry never freeze. Empty: off. See speedrun.techniques.freezing.
    block_train_fracs: tuple[float, ...] = ()
    dirac: bool = False  # start the first min(in, out) filters of each 3x3 conv as the identity (airbench)
    # In a data-parallel job (speedrun.train.distributed): BatchNorm statistics over the global batch
    # (SyncBatchNorm, GPUs only), not each rank's share of it. No effect in a single process.
    sync_bn: bool = False


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw", "adadelta", "lars", "lamb", "muon"] = "sgd"
    lr: float = 2.0  # peak LR at a batch of lr_batch_size; scaled linearly to train.batch_size
    lr_batch_size: int = 1024
    momentum: float = 0.9
    nesterov: bool = True
    # L2 coefficient (PyTorch convention: the step shrinks weights by lr * weight_decay). With the
    # LR scaled linearly in batch size, the decay per example stays constant across batch sizes.
    weight_decay: float = 5e-4
    # Decoupled weight decay (airbench's unit): when > 0, weight_decay is instead the fraction of each
    # weight decayed per wd_batch_size training examples at the schedule's peak, whatever optim.lr is:
    # torch's per-group coefficient becomes weight_decay * train.batch_size / (wd_batch_size * group LR).
    wd_batch_size: int = 0
    bn_weight_decay: bool = False  # apply weight decay to norm weights and biases
    bias_lr_scale: float = 1.0  # LR multiplier for BatchNorm biases, in a group of their own (airbench: 64)
    trust_coefficient: float = 0.001  # lars: η in the layer-wise LR η·|w| / (|g| + wd·|w|)
    # muon: conv filter banks take orthogonalized momentum steps of this absolute size (not scaled with
    # the batch, no weight decay); the other parameters follow lr/momentum/weight_decay as with sgd.
    muon_lr: float = 0.1
    muon_momentum: float = 0.8
    # muon: before each step, rescale every filter bank to Frobenius norm √(output channels) (airbench94_muon).
    # The BatchNorm after each conv makes the scale irrelevant to the function, so this only fixes the
    # step's size relative to the weights, which otherwise shrinks as the filters' norms grow.
    muon_normalize: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    kind: Literal["one-cycle", "cosine", "step", "constant"] = "one-cycle"
    warmup_frac: float = 0.25  # one-cycle, cosine: fraction of training spent rising to the peak
    start_factor: float = 0.1  # one-cycle, cosine: LR at step 0, as a fraction of the peak
    end_factor: float = 0.0  # one-cycle, cosine: LR at the end, as a fraction of the peak
    step_gamma: float = 0.7  # step: multiply the LR by this every epoch
    # Momentum cycling (fast.ai's one-cycle): momentum falls from optim.momentum to this while the LR
    # rises, and climbs back as it falls. 0 leaves the momentum constant.
    momentum_low: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 5.0  # length of the schedule
    batch_size: int = 256
    label_smoothing: float = 0.1
    channels_last: bool = True
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    retain_memory: bool = False  # keep freed memory in the process (glibc mallopt); process-wide
    # 3x3 convs over 3x3 maps take their weight gradient as one matmul (speedrun.techniques.small_convs);
    # auto: where it was measured to pay, a bf16 run on a CPU with AMX.
    dense_conv_grad: Literal["off", "on", "auto"] = "off"
    # Write a checkpoint (speedrun.train.checkpoint) after a step once this many seconds of the run's clock
    # have passed since the last: runs shorter than that write none; 0: never. For `train --resume`.
    checkpoint_every_s: float = 300.0
    keep_checkpoint: bool = False  # keep the last checkpoint of a run that ended by itself (else deleted)


# Keys that decide how a run is kept, not how it trains: not part of a recipe's identity (compare's
# recipe key), so runs from before they existed compare with runs after.
KEEPING_KEYS = ("train.checkpoint_every_s", "train.keep_checkpoint")


@dataclass(frozen=True)
class AverageConfig:
    """Weight averaging. ``lookahead`` (airbench's variant): every ``every`` steps the slow weights move
    toward the fast ones and the fast weights restart from the slow; averaging strength grows as
    ``decay**every * progress**3``, so early training is untouched and the end is smoothed.
    ``ema``: a bias-corrected exponential moving average of the weights with ``decay`` per step,
    updated every ``every`` steps (with ``decay**every``); evaluations and the final model use it."""

    kind: Literal["none", "lookahead", "ema"] = "none"
    every: int = 5
    decay: float = 0.95


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: float = 0.5  # evaluate every this many epochs ...
    every_s: float = 0.0  # ... or every this many seconds (0: off)
    start_frac: float = 0.0  # no evaluation before this fraction of the schedule
    batch_size: int = 1024
    tta_flip: bool = False  # average the logits of each image and its mirror
    tta_translate_px: int = 0  # also average over copies shifted by +-(N, N) pixels (reflect padding)
    # The split the target is judged on: test, or val (the hold-out of data.val_frac). A run with a
    # validation split reports both accuracies at the end (speedrun tune judges its trials on val).
    split: Literal["test", "val"] = "test"
    # data.layout=aspect: each test image is resized so its shorter side is crop_size / crop_frac, and its
    # centre crop_size x crop_size evaluated (ImageNet's 224 from 256: crop_frac 0.875). crop_size 0:
    # data.crop_size; larger than the last training size, it corrects the apparent object size of
    # random-resized crops (Touvron et al. 2019, FixRes: "train at 128, test at 160").
    crop_size: int = 0
    crop_frac: float = 0.875


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    target: float = 0.92  # held-out accuracy that stops the clock
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    average: AverageConfig = field(default_factory=AverageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def override(self, values: Mapping[str, Any]) -> Recipe:
        """Return a copy with dotted keys (``"optim.momentum"``) set; strings are parsed by field type."""
        recipe = self
        for key, value in values.items():
            recipe = _set_path(recipe, key.split("."), value, key)
        validate(recipe)
        return recipe

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def validate(recipe: Recipe) -> None:
    """Reject values no run could use, with a message naming the key."""
    checks = [
        (0.0 < recipe.target <= 1.0, "target must be in (0, 1]"),
        (recipe.train.epochs > 0, "train.epochs must be > 0"),
        (recipe.train.batch_size > 0, "train.batch_size must be > 0"),
        (recipe.train.checkpoint_every_s >= 0, "train.checkpoint_every_s must be >= 0 (0: no checkpoints)"),
        (recipe.optim.lr > 0 and recipe.optim.lr_batch_size > 0, "optim.lr and optim.lr_batch_size must be > 0"),
        (0.0 <= recipe.train.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
        (recipe.eval.every_epochs > 0 or recipe.eval.every_s > 0,
         "eval.every_epochs or eval.every_s must be > 0"),
        (0.0 <= recipe.eval.start_frac <= 1.0, "eval.start_frac must be in [0, 1]"),
        (0.0 <= recipe.schedule.warmup_frac < 1.0, "schedule.warmup_frac must be in [0, 1)"),
        (0.0 <= recipe.schedule.momentum_low <= recipe.optim.momentum or recipe.schedule.momentum_low == 0,
         "schedule.momentum_low must be in [0, optim.momentum]"),
        (len(recipe.model.widths) > 0, "model.widths must not be empty"),
        (all(0 <= i < len(recipe.model.widths) for i in recipe.model.pools),
         "model.pools must index convs in model.widths"),
        (0.0 < recipe.data.resize_start_scale <= 1.0 and 0.0 <= recipe.data.resize_full_frac <= 1.0,
         "data.resize_start_scale must be in (0, 1] and data.resize_full_frac in [0, 1]"),
        (recipe.data.translate_px >= 0 and recipe.data.cutout_px >= 0,
         "data.translate_px and data.cutout_px must be >= 0"),
        (recipe.model.stem_kernel >= 1 and recipe.model.whiten_eps > 0,
         "model.stem_kernel must be >= 1 and model.whiten_eps > 0"),
        (0.0 <= recipe.model.stem_train_frac <= 1.0, "model.stem_train_frac must be in [0, 1]"),
        (all(0.0 <= f <= 1.0 for f in recipe.model.block_train_fracs),
         "model.block_train_fracs must be fractions in [0, 1], one per block from the first (empty: off)"),
        (recipe.data.max_size >= 0, "data.max_size must be >= 0 (0: the source's default)"),
        (recipe.data.crop_size >= 0 and recipe.eval.crop_size >= 0 and recipe.data.decode_workers >= 0,
         "data.crop_size, eval.crop_size and data.decode_workers must be >= 0"),
        (0.0 < recipe.eval.crop_frac <= 1.0, "eval.crop_frac must be in (0, 1]"),
        (recipe.data.layout == "aspect" or (recipe.data.crop_size == 0 and recipe.eval.crop_size == 0
                                            and recipe.data.loader != "decode"),
         "data.crop_size, eval.crop_size and data.loader=decode need data.layout=aspect"),
        (recipe.data.rrc_scale == () or (len(recipe.data.rrc_scale) == 2
                                         and 0 < recipe.data.rrc_scale[0] <= recipe.data.rrc_scale[1] <= 1),
         "data.rrc_scale must be empty (off) or lo,hi with 0 < lo <= hi <= 1"),
        (len(recipe.data.rrc_ratio) == 2 and 0 < recipe.data.rrc_ratio[0] <= recipe.data.rrc_ratio[1],
         "data.rrc_ratio must be lo,hi with 0 < lo <= hi"),
        (recipe.data.mixup_alpha >= 0 and recipe.data.cutmix_alpha >= 0 and 0 <= recipe.data.mix_prob <= 1,
         "data.mixup_alpha and data.cutmix_alpha must be >= 0 and data.mix_prob in [0, 1]"),
        (recipe.eval.tta_translate_px >= 0, "eval.tta_translate_px must be >= 0"),
        (0.0 <= recipe.data.val_frac <= 0.5, "data.val_frac must be in [0, 0.5] (0: no validation split)"),
        (recipe.eval.split == "test" or recipe.data.val_frac > 0,
         "eval.split=val needs a validation split: set data.val_frac (e.g. 0.1)"),
        (recipe.average.every >= 1 and 0 <= recipe.average.decay < 1,
         "average.every must be >= 1 and average.decay in [0, 1)"),
        (recipe.model.bn_momentum is None or 0.0 <= recipe.model.bn_momentum <= 1.0,
         "model.bn_momentum must be in [0, 1] (PyTorch convention: the weight of the new batch)"),
        (not (recipe.model.zero_init_residual and recipe.model.bn_frozen_scale),
         "model.zero_init_residual and model.bn_frozen_scale together would freeze residual branches at 0"),
        (recipe.optim.weight_decay >= 0 and recipe.optim.wd_batch_size >= 0,
         "optim.weight_decay and optim.wd_batch_size must be >= 0"),
        (recipe.optim.bias_lr_scale > 0, "optim.bias_lr_scale must be > 0"),
        (recipe.optim.trust_coefficient > 0, "optim.trust_coefficient must be > 0"),
        (recipe.optim.muon_lr > 0 and 0 <= recipe.optim.muon_momentum < 1,
         "optim.muon_lr must be > 0 and optim.muon_momentum in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A recipe file's keys, flattened to dotted ``section.key`` names (``base`` and ``name`` stay
    top-level); ConfigError for a file that is missing, a folder, not UTF-8 or not TOML.
    ``speedrun.recipes.load_toml`` applies them to their base recipe."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {path} is a folder, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 by definition; read_text would use the locale's codec
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    flat: dict[str, Any] = {"name": path.stem}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _set_path(obj: Any, parts: list[str], value: Any, full_key: str) -> Any:
    names = {f.name: f for f in fields(obj)}
    head = parts[0]
    if head not in names:
        prefix = full_key[: len(full_key) - len(".".join(parts))]
        valid = ", ".join(prefix + n for n in names)
        raise ConfigError(f"unknown key {full_key!r}; valid keys here: {valid}")
    current = getattr(obj, head)
    if len(parts) == 1:
        if is_dataclass(current):
            raise ConfigError(f"{full_key!r} is a section; set one of its keys, e.g. {full_key}.{fields(current)[0].name}")
        hint = typing.get_type_hints(type(obj))[head]
        return replace(obj, **{head: _coerce(value, hint, full_key)})
    if not is_dataclass(current):
        raise ConfigError(f"{'.'.join(full_key.split('.')[:-len(parts) + 1])!r} is not a section")
    return replace(obj, **{head: _set_path(current, parts[1:], value, full_key)})


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (often a CLI string) to the type ``hint``, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if origin is Literal:
            if value not in args:
                raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
            return value
        if origin in (typing.Union, types.UnionType):
            if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
                if type(None) in args:
                    return None
            inner = [a for a in args if a is not type(None)]
            return _coerce(value, inner[0], key)
        if origin is tuple:
            items = value
            if isinstance(value, str):
                items = [v for v in value.strip("()[] ").split(",") if v.strip()]
            return tuple(_coerce(v, args[0], key) for v in items)
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is str:
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key} expects {_type_name(hint)}; got {value!r}") from None
    raise ConfigError(f"{key}: unsupported type {hint}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"a comma-separated list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "text"}.get(hint, str(hint))


# Keys that stored recipes may hold from an earlier version: old key -> the (key, value) pairs that
# replace it, given its value.
_REPLACED_KEYS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "model.whiten_bias_trainable": lambda trainable: {} if trainable else {"model.stem_train_frac": 0.0},
}


def from_dict(data: Mapping[str, Any]) -> Recipe:
    """Rebuild a recipe from ``Recipe.to_dict()`` output (e.g. a stored run)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    for old, replace in _REPLACED_KEYS.items():
        if old in flat:
            flat.update(replace(flat.pop(old)))
    return Recipe().override(flat)


def flatten_keys(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict (a stored recipe) as dotted keys: ``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
