"""The technique catalog: frozen records saying what each technique does, where it comes from,
when it helps, what it costs, how a recipe switches it on, and how to take it out (for ablations).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from speedrun.config import Recipe


@dataclass(frozen=True)
class Technique:
    name: str
    summary: str  # what it does
    source: str  # the paper or record it comes from
    helps_when: str
    cost: str
    switch: str  # the recipe keys that control it
    enabled: Callable[[Recipe], bool]
    disable: Callable[[Recipe], Recipe]  # the same recipe without this technique


def _set(recipe: Recipe, section: str, **values) -> Recipe:
    return replace(recipe, **{section: replace(getattr(recipe, section), **values)})


TECHNIQUES: dict[str, Technique] = {t.name: t for t in (
    Technique(
        "one-cycle",
        "LR rises linearly to its peak, then falls linearly to ~0 (triangular one-cycle)",
        "Smith & Topin 2018, super-convergence; fast.ai DAWNBench; airbench",
        "short schedules: most of the accuracy comes in the final low-LR phase",
        "none", "schedule.kind, schedule.warmup_frac, schedule.start_factor, schedule.end_factor",
        lambda r: r.schedule.kind == "one-cycle",
        lambda r: _set(r, "schedule", kind="step", step_gamma=0.7)),
    Technique(
        "warmup-cosine",
        "LR rises linearly for a warm-up fraction, then follows a half cosine down",
        "Goyal et al. 2017 (warm-up); Loshchilov & Hutter 2017 (cosine); Composer's ResNet-50 recipes",
        "large batches and long schedules",
        "none", "schedule.kind=cosine, schedule.warmup_frac, schedule.start_factor, schedule.end_factor",
        lambda r: r.schedule.kind == "cosine",
        lambda r: _set(r, "schedule", kind="step", step_gamma=0.7)),
    Technique(
        "momentum-cycling",
        "momentum falls while the LR warms up and climbs back as it anneals (e.g. 0.95 -> 0.85 -> 0.95)",
        "Smith 2018; fast.ai's DAWNBench CIFAR-10 entry",
        "one-cycle schedules with high peak LR",
        "none", "schedule.momentum_low (optim.momentum is the high end)",
        lambda r: r.schedule.momentum_low > 0,
        lambda r: _set(r, "schedule", momentum_low=0.0)),
    Technique(
        "label-smoothing",
        "trains against (1 - s) one-hot + s uniform targets",
        "Szegedy et al. 2016; Google's TPU DAWNBench entries; airbench (s=0.2)",
        "over-confident networks, short schedules",
        "none", "train.label_smoothing",
        lambda r: r.train.label_smoothing > 0,
        lambda r: _set(r, "train", label_smoothing=0.0)),
    Technique(
        "flip",
        "mirrors a random half of each batch left-right",
        "standard augmentation (Krizhevsky 2012); airbench",
        "images whose class is mirror-invariant",
        "a batched tensor op per step", "data.flip",
        lambda r: r.data.flip,
        lambda r: _set(r, "data", flip=False)),
    Technique(
        "alternating-flip",
        "flips each image in alternate epochs (random only in the first), instead of by chance each time",
        "airbench (Jordan 2024)",
        "short schedules, where random flips leave some images seen one way only",
        "none", "data.flip, data.alternating_flip",
        lambda r: r.data.flip and r.data.alternating_flip,
        lambda r: _set(r, "data", alternating_flip=False)),
    Technique(
        "cutout",
        "zeroes a random square of each image",
        "DeVries & Taylor 2017; Myrtle.ai's CIFAR-10 runs",
        "longer schedules that overfit; usually hurts very short ones",
        "a batched mask per step", "data.cutout_px",
        lambda r: r.data.cutout_px > 0,
        lambda r: _set(r, "data", cutout_px=0)),
    Technique(
        "progressive-resizing",
        "trains on smaller images early, growing linearly to full size for the final part",
        "fast.ai ImageNet in 18 min; Google's TPU DAWNBench entry (2.7 h); Composer",
        "compute-bound training of convnets on larger images; less so at 28 px",
        "a batched antialiased resize per step", "data.resize_start_scale, data.resize_full_frac",
        lambda r: r.data.resize_start_scale < 1.0,
        lambda r: _set(r, "data", resize_start_scale=1.0)),
    Technique(
        "resize-batch-scaling",
        "with progressive resizing, batch size x (full/size)^2 (at most 4x) at low resolution, LR scaled alike",
        "fast.ai ImageNet in 18 min (larger batches at 128 px); Goyal et al. 2017 (linear scaling rule)",
        "when small-image steps are too short to use the device well (GPUs); fewer, larger steps early",
        "none; fewer optimizer steps", "data.resize_scale_batch, data.resize_start_scale",
        lambda r: r.data.resize_scale_batch and r.data.resize_start_scale < 1.0,
        lambda r: _set(r, "data", resize_scale_batch=False)),
    Technique(
        "translate",
        "shifts each image by up to N pixels with reflect padding",
        "Myrtle.ai; airbench (2 px)",
        "small datasets; longer schedules",
        "a batched gather per step", "data.translate_px",
        lambda r: r.data.translate_px > 0,
        lambda r: _set(r, "data", translate_px=0)),
    Technique(
        "random-resized-crop",
        "crops a random box per image (random area fraction and aspect ratio) and resizes it to the training size",
        "Szegedy et al. 2015 (Inception); the standard ImageNet augmentation; fast.ai DAWNBench",
        "larger images and longer schedules; objects at varied scales and positions",
        "two small batched matmuls per step (crop and resize in one op)", "data.rrc_scale, data.rrc_ratio",
        lambda r: bool(r.data.rrc_scale),
        lambda r: _set(r, "data", rrc_scale=())),
    Technique(
        "mixup",
        "trains on blends lam * x_i + (1 - lam) * x_j of image pairs against the same blend of their labels",
        "Zhang et al. 2018 (mixup); timm's ImageNet recipes",
        "long schedules and large models that overfit; slows convergence of short runs",
        "a batched lerp per mixed batch", "data.mixup_alpha, data.mix_prob",
        lambda r: r.data.mixup_alpha > 0,
        lambda r: _set(r, "data", mixup_alpha=0.0)),
    Technique(
        "cutmix",
        "pastes a random box of one image into another; labels mix by the pasted area",
        "Yun et al. 2019 (CutMix); timm's ImageNet recipes",
        "long schedules and large models that overfit; slows convergence of short runs",
        "a batched copy per mixed batch", "data.cutmix_alpha, data.mix_prob",
        lambda r: r.data.cutmix_alpha > 0,
        lambda r: _set(r, "data", cutmix_alpha=0.0)),
    Technique(
        "channels-last",
        "NHWC memory format for activations and conv weights",
        "PyTorch performance guide; hlb-CIFAR10",
        "convolutions on oneDNN (CPU) and tensor cores (GPU): ~1.5x on this CPU",
        "none", "train.channels_last",
        lambda r: r.train.channels_last,
        lambda r: _set(r, "train", channels_last=False)),
    Technique(
        "no-decay-norm-bias",
        "no weight decay on BatchNorm parameters and biases",
        "Goyal et al. 2017; Jia et al. 2018",
        "large batches; any net with BN",
        "none", "optim.bn_weight_decay",
        lambda r: not r.optim.bn_weight_decay and r.optim.weight_decay > 0,
        lambda r: _set(r, "optim", bn_weight_decay=True)),
    Technique(
        "lookahead",
        "every k steps pulls the weights toward a slow average, more strongly as training ends",
        "Zhang et al. 2019 (Lookahead); airbench's scheduled variant",
        "noisy final phase of short schedules; airbench found it needs fast BN momentum",
        "one lerp and copy of the weights every k steps", "average.kind, average.every, average.decay",
        lambda r: r.average.kind == "lookahead",
        lambda r: _set(r, "average", kind="none")),
    Technique(
        "flip-tta",
        "at evaluation, averages the logits of each image and its mirror",
        "Myrtle.ai (26 s CIFAR-10); airbench",
        "when an evaluation is cheap relative to the training it saves",
        "doubles evaluation compute", "eval.tta_flip",
        lambda r: r.eval.tta_flip,
        lambda r: _set(r, "eval", tta_flip=False)),
    Technique(
        "translate-tta",
        "at evaluation, also averages the logits of copies shifted by +-(N, N) pixels (x2 with flip-TTA)",
        "airbench (TTA level 2: 1 px diagonal shifts)",
        "small images where a pixel's shift changes the prediction; cheap evaluations",
        "triples evaluation compute", "eval.tta_translate_px",
        lambda r: r.eval.tta_translate_px > 0,
        lambda r: _set(r, "eval", tta_translate_px=0)),
)}


def enabled_techniques(recipe: Recipe) -> list[str]:
    return [t.name for t in TECHNIQUES.values() if t.enabled(recipe)]
