"""The technique catalog: frozen records saying what each technique does, where it comes from,
when it helps, what it costs, how a recipe switches it on, how to take it out (for ablations), and
how the trainer assembles it.

Assembly. A record with an ``apply`` takes part in building a run at one of three stages: ``start``
(``start(recipe)``, before data and model exist: its records' ``apply`` takes the recipe and sets
up the process), then ``model`` (the model is built, the optimizer not yet) and ``train`` (the optimizer
exists), where the trainer calls ``assemble`` and each enabled record of that stage, in ``order``, changes
the ``Assembly`` (the model, loss, autocast, the net the loop calls) and may return a fit hook, which
the loop runs at the record's ``order`` among the hooks (``after_*`` events in reverse). Records that
share an ``apply`` (mixup and CutMix: one batch mixer) run it once. A record without ``apply`` is a
switch read by one of the trainer's own parts: the loader (augmentation), the optimizer registry
(``speedrun.techniques.optimizers``), the LR schedule or the evaluator (test-time augmentation).

A technique that needs something of the model's structure names it in ``needs`` (``CAPABILITIES``);
``check_model`` refuses it, before a run's clock starts, on a model without it, and on one where the
record's ``check`` finds the recipe does not fit the model (more freeze fractions than blocks).

Listing the catalog must not import torch (``speedrun techniques`` answers in a fraction of a
second), so the ``apply`` functions import their technique modules when called.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

from speedrun import cpuinfo
from speedrun.config import ConfigError, Recipe

if TYPE_CHECKING:
    from torch import nn

    from speedrun.train.assembly import Assembly

Stage = Literal["start", "model", "train"]

# Fit-hook positions. The trainer's own hooks sit between them: the LR schedule at 30, the divergence
# guard at 40, the evaluator at 50, a user's hooks at 85, the time budget at 90, the progress bar at 95.
# Averaging comes after the evaluator so that its after_step (after_* run in reverse) hands the
# evaluator the averaged weights.
ORDER_MIX, ORDER_RESIZE, ORDER_FREEZE, ORDER_AVERAGE = 10, 20, 60, 70


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
    process_wide: bool = False  # once on, stays on for the rest of the process (in-process ablation can't undo it)
    stage: Stage | None = None  # when ``apply`` runs; None: a switch read by the trainer's own parts
    # Changes the assembly and may return a fit hook; a ``start`` record's takes the recipe instead.
    apply: Callable[[Assembly], object | None] | Callable[[Recipe], None] | None = None
    order: int = 50  # within its stage, and its hook's place among the fit hooks
    needs: tuple[str, ...] = ()  # model capabilities (CAPABILITIES) it cannot work without
    # A further test of the recipe against a model that has the ``needs``: the problem, said in one line, or None.
    check: Callable[[Recipe, Any], str | None] | None = None


def _set(recipe: Recipe, section: str, **values) -> Recipe:
    return replace(recipe, **{section: replace(getattr(recipe, section), **values)})


# ---------------------------------------------------------------- what techniques need of a model

def _odd_kernel_convs(model: nn.Module) -> list:
    """Ungrouped convs with odd kernels and trainable weights: those ``dirac-init`` starts as the identity."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.requires_grad
            and all(k % 2 for k in m.kernel_size)]


def _has_batchnorm(model: nn.Module) -> bool:
    from speedrun.techniques.normalization import batchnorms

    return bool(batchnorms(model))


def _has_residual_ends(model: nn.Module) -> bool:
    from speedrun.techniques.normalization import RESIDUAL_END, batchnorms

    return any(getattr(bn, RESIDUAL_END, False) for bn in batchnorms(model))


# name -> (a test on the built model, what the model must have, said in an error when it has not)
CAPABILITIES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "init_from_data": (lambda m: callable(getattr(m, "init_from_data", None)),
                       "a method init_from_data(images) that sets its first layer from training images"),
    "stem_parameters": (lambda m: callable(getattr(m, "stem_parameters", None)),
                        "a method stem_parameters() returning the parameters of its first layer"),
    "block_parameters": (lambda m: callable(getattr(m, "block_parameters", None)),
                         "a method block_parameters() returning one list of parameters per block after "
                         "its first layer, from the input on"),
    "residual_ends": (_has_residual_ends, "BatchNorm layers marked as the end of a residual branch "
                                          "(speedrun.techniques.normalization.mark_residual_end)"),
    "batchnorm": (_has_batchnorm, "BatchNorm layers"),
    "odd_kernel_convs": (lambda m: bool(_odd_kernel_convs(m)), "trainable ungrouped convolutions with odd kernels"),
}


# ---------------------------------------------------------------- what the records apply

def _retain_memory(recipe: Recipe) -> None:
    from speedrun.techniques.allocator import retain_freed_memory

    retain_freed_memory()


def _dense_conv_grad_on(r: Recipe) -> bool:
    """``on``; or ``auto`` on a CPU with AMX, where it was measured to pay (its ``apply`` then also wants a
    bf16 CPU run). Elsewhere ``auto`` is a no-op, which ablations would only spend runs on."""
    setting = r.train.dense_conv_grad
    return setting == "on" or (setting == "auto" and "amx_bf16" in cpuinfo.cpu_flags())


def _dense_conv_grad(a: Assembly) -> None:
    from speedrun.techniques.small_convs import dense_weight_grad

    if a.recipe.train.dense_conv_grad == "auto" and not (a.device.type == "cpu" and a.precision == "bf16"):
        return  # auto on a GPU, or precision=auto resolved to fp32
    dense_weight_grad(a.model)


def _zero_init_residual(a: Assembly) -> None:
    from speedrun.techniques.normalization import zero_init_residual_bn

    zero_init_residual_bn(a.model)


def _bn_momentum(a: Assembly) -> None:
    from speedrun.techniques.normalization import set_bn_momentum

    set_bn_momentum(a.model, a.recipe.model.bn_momentum)


def _frozen_bn_scale(a: Assembly) -> None:
    from speedrun.techniques.normalization import freeze_bn_scales

    freeze_bn_scales(a.model)


def _dirac(a: Assembly) -> None:
    from speedrun.techniques.conv_init import dirac_init_

    for conv in _odd_kernel_convs(a.model):
        dirac_init_(conv)


def _whiten(a: Assembly) -> None:
    # Inside the clock and redone by every run: it reads training images (airbench whitens on 5,000).
    a.model.init_from_data(a.train_loader.sample(a.init_images))


def _channels_last(a: Assembly) -> None:
    import torch

    a.model = a.model.to(memory_format=torch.channels_last)


def _freeze_stem(a: Assembly) -> object | None:
    from speedrun.techniques.freezing import FreezeStem, freeze_

    if a.recipe.model.stem_train_frac == 0:  # never trained: frozen before the optimizer collects parameters
        freeze_(a.model.stem_parameters())
        return None
    return FreezeStem(a.model.stem_parameters(), after_frac=a.recipe.model.stem_train_frac)


def _freeze_blocks(a: Assembly) -> object:
    from speedrun.techniques.freezing import FreezeOut

    return FreezeOut(a.model.block_parameters(), a.recipe.model.block_train_fracs)


def _check_block_count(recipe: Recipe, model: Any) -> str | None:
    fracs, blocks = recipe.model.block_train_fracs, len(model.block_parameters())
    if len(fracs) > blocks:
        return (f"model.block_train_fracs gives {len(fracs)} fractions, but the model has {blocks} "
                f"block{'s' * (blocks != 1)} after its first layer")
    return None


def _mix(a: Assembly) -> object:
    from speedrun.techniques.mixing import MixBatch

    d = a.recipe.data
    return MixBatch(a.num_classes, mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha, prob=d.mix_prob,
                    seed=a.seed)


def _resize(a: Assembly) -> object:
    from speedrun.techniques.resizing import ProgressiveResize

    return ProgressiveResize(a.recipe.data, native=a.native_size)


def _lookahead(a: Assembly) -> object:
    from speedrun.techniques.averaging import Lookahead

    return Lookahead(a.recipe.average)


def _ema(a: Assembly) -> object:
    from speedrun.techniques.averaging import EMA

    return EMA(a.recipe.average)


def _label_smoothing(a: Assembly) -> None:
    import functools

    from speedrun.techniques.label_smoothing import smoothed_cross_entropy

    a.loss_fn = functools.partial(smoothed_cross_entropy, smoothing=a.recipe.train.label_smoothing)


def _mixed_precision(a: Assembly) -> None:
    import torch

    from speedrun.techniques.precision import autocast_for

    a.autocast = autocast_for(a.precision, a.device)
    a.grad_scaler = torch.amp.GradScaler(a.device.type) if a.precision == "fp16" else None


def _compile(a: Assembly) -> None:
    from speedrun.techniques.compile import compile_model

    a.net = compile_model(a.model, a.recipe, native=a.native_size)


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
        lambda r: _set(r, "train", label_smoothing=0.0),
        stage="train", apply=_label_smoothing),
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
        lambda r: _set(r, "data", resize_start_scale=1.0),
        stage="train", apply=_resize, order=ORDER_RESIZE),
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
        "crops a random box per image (random area fraction and aspect ratio; from the whole stored picture when "
        "data.layout=aspect) and resizes it to the training size",
        "Szegedy et al. 2015 (Inception); the standard ImageNet augmentation; fast.ai DAWNBench",
        "larger images and longer schedules; objects at varied scales and positions",
        "two small batched matmuls per step (crop and resize in one op); on aspect caches one uint8 resize per image "
        "(~0.5 ms on this CPU), which replaces the evaluation-style centre crop taken without it",
        "data.rrc_scale, data.rrc_ratio",
        lambda r: bool(r.data.rrc_scale),
        lambda r: _set(r, "data", rrc_scale=())),
    Technique(
        "fixres",
        "evaluates at a higher resolution than the last training size (resize, then centre crop), so objects "
        "appear at the size random-resized crops showed them",
        "Touvron et al. 2019 (FixRes: train 128, test 160 px); FFCV's ResNet-50 (train <= 192, test 256); "
        "fast.ai's ImageNet in 18 minutes (rectangular validation at larger sizes)",
        "random-resized crops, whose zoom makes objects look larger in training than in centre crops",
        "evaluation FLOPs x (test / train size)^2", "eval.crop_size > data.crop_size (data.layout=aspect), eval.crop_frac",
        lambda r: r.data.layout == "aspect" and r.eval.crop_size > 0 and (
            r.data.crop_size == 0 or r.eval.crop_size > r.data.crop_size),
        lambda r: _set(r, "eval", crop_size=0)),
    Technique(
        "mixup",
        "trains on blends lam * x_i + (1 - lam) * x_j of image pairs against the same blend of their labels",
        "Zhang et al. 2018 (mixup); timm's ImageNet recipes",
        "long schedules and large models that overfit; slows convergence of short runs",
        "a batched lerp per mixed batch", "data.mixup_alpha, data.mix_prob",
        lambda r: r.data.mixup_alpha > 0,
        lambda r: _set(r, "data", mixup_alpha=0.0),
        stage="train", apply=_mix, order=ORDER_MIX),
    Technique(
        "cutmix",
        "pastes a random box of one image into another; labels mix by the pasted area",
        "Yun et al. 2019 (CutMix); timm's ImageNet recipes",
        "long schedules and large models that overfit; slows convergence of short runs",
        "a batched copy per mixed batch", "data.cutmix_alpha, data.mix_prob",
        lambda r: r.data.cutmix_alpha > 0,
        lambda r: _set(r, "data", cutmix_alpha=0.0),
        stage="train", apply=_mix, order=ORDER_MIX),
    Technique(
        "channels-last",
        "NHWC memory format for activations and conv weights",
        "PyTorch performance guide; hlb-CIFAR10",
        "convolutions on oneDNN (CPU) and tensor cores (GPU): ~1.5x on this CPU",
        "none", "train.channels_last",
        lambda r: r.train.channels_last,
        lambda r: _set(r, "train", channels_last=False),
        stage="model", apply=_channels_last, order=40),
    Technique(
        "retain-memory",
        "keeps freed blocks in the process (glibc mallopt) so steps stop page-faulting their buffers back in",
        "jemalloc/tcmalloc advice in Intel's PyTorch CPU tuning guide; done here in-process",
        "CPU runs with activations of tens of MB (cifar10-cpu's six-view evaluation at batch 1,000: 1.9x on the "
        "2-core EPYC; the fashion-mnist step: ~1x); glibc only",
        "memory is not returned to the OS until exit; process-wide, stays on for later runs in the process",
        "train.retain_memory",
        lambda r: r.train.retain_memory,
        lambda r: _set(r, "train", retain_memory=False),
        process_wide=True, stage="start", apply=_retain_memory),
    Technique(
        "dense-conv-grad",
        "takes the weight gradient of each 3x3 conv over a 3x3 map as one matmul over the batch, folded into "
        "the filter's taps, instead of oneDNN's backward-weights kernel",
        "this project (a 3x3 conv on a 3x3 map is a dense linear map)",
        "nets that pool down to 3x3 px, on CPUs whose matmuls far outrun that kernel: the fashion-mnist step "
        "1.12x in bf16 on a 2-core Xeon with AMX (the two 3 px convs' weight gradients 3.5-5x; whole runs: "
        "not resolved from that host's noise at 5 seeds); ~1x for cifar10-cpu there; not measured elsewhere "
        "(auto: AMX and bf16 only)",
        "none: the same gradient to rounding", "train.dense_conv_grad",
        _dense_conv_grad_on,
        lambda r: _set(r, "train", dense_conv_grad="off"),
        stage="model", apply=_dense_conv_grad, order=45),
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
        lambda r: _set(r, "average", kind="none"),
        stage="train", apply=_lookahead, order=ORDER_AVERAGE),
    Technique(
        "ema",
        "keeps a bias-corrected exponential moving average of the weights; evaluations and the final model use it",
        "Polyak & Juditsky 1992; Tan & Le 2019 (EfficientNet); timm's ModelEma",
        "a noisy final phase: high LR, or a schedule that does not anneal to ~0",
        "a copy of the weights; one lerp of them every k steps",
        "average.kind=ema, average.decay (per step), average.every",
        lambda r: r.average.kind == "ema",
        lambda r: _set(r, "average", kind="none"),
        stage="train", apply=_ema, order=ORDER_AVERAGE),
    Technique(
        "zero-init-residual",
        "starts each residual block as the identity: γ = 0 in the BatchNorm that ends its branch",
        "Goyal et al. 2017 (ImageNet in 1 hour); He et al. 2019 (Bag of Tricks)",
        "residual nets at a high LR or large batch (needs a model that marks its residual BNs)",
        "none", "model.zero_init_residual",
        lambda r: r.model.zero_init_residual,
        lambda r: _set(r, "model", zero_init_residual=False),
        stage="model", apply=_zero_init_residual, order=10, needs=("residual_ends",)),
    Technique(
        "bn-momentum",
        "sets every BatchNorm's running-statistics momentum (PyTorch's: the weight of the new batch)",
        "airbench (0.4 in PyTorch's convention)",
        "short schedules and weight averaging, where weights move faster than the default 0.1 follows",
        "none", "model.bn_momentum",
        lambda r: r.model.bn_momentum is not None,
        lambda r: _set(r, "model", bn_momentum=None),
        stage="model", apply=_bn_momentum, order=10, needs=("batchnorm",)),
    Technique(
        "frozen-bn-scale",
        "keeps every BatchNorm γ at its initial 1, untrained; the next layer's weights absorb the scale",
        "airbench (Jordan 2024)",
        "BN followed by a conv or linear layer; short schedules",
        "none (fewer parameters to update)", "model.bn_frozen_scale",
        lambda r: r.model.bn_frozen_scale,
        lambda r: _set(r, "model", bn_frozen_scale=False),
        stage="model", apply=_frozen_bn_scale, order=10, needs=("batchnorm",)),
    Technique(
        "bn-bias-lr",
        "trains BatchNorm biases at a multiple of the LR, in a param group of their own (same decay per step)",
        "airbench (64x the LR)",
        "BN nets with frozen or slow scales, short schedules",
        "none", "optim.bias_lr_scale",
        lambda r: r.optim.bias_lr_scale != 1.0,
        lambda r: _set(r, "optim", bias_lr_scale=1.0),
        needs=("batchnorm",)),
    Technique(
        "lr-scaling",
        "optim.lr is stated for optim.lr_batch_size examples and scaled linearly to train.batch_size",
        "Krizhevsky 2014; Goyal et al. 2017",
        "changing the batch size without retuning; past ~8k (ImageNet) it needs warm-up or LARS",
        "none", "optim.lr, optim.lr_batch_size (off: optim.lr used as is at train.batch_size)",
        lambda r: r.optim.lr_batch_size != r.train.batch_size,
        lambda r: _set(r, "optim", lr_batch_size=r.train.batch_size)),
    Technique(
        "decoupled-weight-decay",
        "weight decay stated per optim.wd_batch_size examples, independent of the LR; a unit, not a change of "
        "training: disable gives the equivalent coupled coefficient",
        "Loshchilov & Hutter 2019 (decoupling); airbench (decay per 1024 examples)",
        "tuning the LR or batch size without moving the decay",
        "none", "optim.wd_batch_size, optim.weight_decay",
        lambda r: r.optim.wd_batch_size > 0,
        lambda r: _set(r, "optim", wd_batch_size=0, weight_decay=r.optim.weight_decay * r.optim.lr_batch_size
                       / (r.optim.wd_batch_size * r.optim.lr))),
    Technique(
        "lars",
        "SGD with a layer-wise LR η·‖w‖/(‖g‖ + wd·‖w‖) per weight tensor; norm parameters and biases excluded",
        "You, Gitman & Ginsburg 2017; MLPerf ResNet-50 entries",
        "very large batches (8k+) of convnets, where one global LR under-trains some layers or diverges others",
        "two norms per weight tensor per step", "optim.name=lars, optim.trust_coefficient, optim.momentum",
        lambda r: r.optim.name == "lars",
        lambda r: _set(r, "optim", name="sgd")),
    Technique(
        "lamb",
        "Adam with decoupled decay and a layer-wise trust ratio ‖w‖/‖update‖ per weight tensor",
        "You et al. 2019 (BERT in 76 minutes)",
        "very large batches where Adam-style steps are wanted",
        "two norms per weight tensor per step", "optim.name=lamb",
        lambda r: r.optim.name == "lamb",
        lambda r: _set(r, "optim", name="adamw")),
    Technique(
        "muon",
        "momentum SGD whose update for each conv filter bank is orthogonalized (Newton-Schulz) before it is applied; "
        "other parameters take plain SGD",
        "Jordan et al. 2024 (Muon); airbench's CIFAR-10 record (94% in 2.59 s vs 3.09 s with SGD)",
        "short schedules of convnets: every filter direction learns, not just the gradient's dominant ones",
        "5 small matrix iterations per filter bank per step (~6% of the fashion-mnist step on 2 CPU cores)",
        "optim.name=muon, optim.muon_lr, optim.muon_momentum, optim.muon_normalize",
        lambda r: r.optim.name == "muon",
        lambda r: _set(r, "optim", name="sgd")),
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
    Technique(
        "patch-whitening",
        "first layer: a frozen k x k conv that whitens the training images' patches (covariance "
        "eigenvectors over sqrt(eigenvalue + eps), both signs; the leading ones if the layer is narrower)",
        "Myrtle.ai (How to train your ResNet 7); hlb-CIFAR10; airbench",
        "short schedules on small images, where the first layer would otherwise spend epochs learning it",
        "one eigendecomposition of a (C k^2)^2 covariance at start; no weight gradient for the stem",
        "model.stem=whiten, model.stem_kernel, model.whiten_eps",
        lambda r: r.model.stem == "whiten",
        # A trainable first layer in its place; one frozen from the start would stay at its random init.
        lambda r: _set(r, "model", stem="conv",
                       stem_train_frac=r.model.stem_train_frac if r.model.stem_train_frac > 0 else 1.0),
        stage="model", apply=_whiten, order=30, needs=("init_from_data",)),
    Technique(
        "stem-freezing",
        "the first layer's trainable parameters (a whitening stem's bias or the BatchNorm after it) "
        "stop training after a fraction of the schedule; the backward then stops at the second layer",
        "airbench (whitening bias frozen after 3 of ~10 epochs); Brock et al. 2017 (FreezeOut)",
        "a frozen or cheap first layer whose few trainable parameters settle early, at high resolution",
        "none; the rest of the schedule skips the first layers' backward", "model.stem_train_frac",
        lambda r: r.model.stem_train_frac < 1.0,
        lambda r: _set(r, "model", stem_train_frac=1.0),
        stage="model", apply=_freeze_stem, order=ORDER_FREEZE, needs=("stem_parameters",)),
    Technique(
        "layer-freezing",
        "the model's first blocks stop training one after another, each after its fraction of the schedule "
        "(FreezeOut); the backward then stops at the first block still training",
        "Brock et al. 2017 (FreezeOut)",
        "CPU-bound training where the early, high-resolution blocks are a large share of the step and "
        "settle before the later ones",
        "accuracy at equal epochs (cifar10-cpu, seed 0: -0.5 points with its first two groups frozen at "
        "60% and 85% of 5 epochs, for 17% less training time): it pays where the time saved buys more",
        "model.block_train_fracs",
        lambda r: len(r.model.block_train_fracs) > 0,
        lambda r: _set(r, "model", block_train_fracs=()),
        stage="model", apply=_freeze_blocks, order=ORDER_FREEZE, needs=("block_parameters",),
        check=_check_block_count),
    Technique(
        "dirac-init",
        "starts the first min(in, out) filters of each trainable odd-kernel conv (3x3, ...) as the identity, the rest random",
        "airbench (an implicit residual for a net without skip connections)",
        "deeper plain (non-residual) conv nets trained briefly",
        "none", "model.dirac",
        lambda r: r.model.dirac,
        lambda r: _set(r, "model", dirac=False),
        stage="model", apply=_dirac, order=20, needs=("odd_kernel_convs",)),
    Technique(
        "mixed-precision",
        "convolutions and matmuls in bf16 (fp16 with loss scaling on CUDA GPUs without bf16) under autocast; "
        "weights, BatchNorm statistics and the optimizer stay fp32",
        "Micikevicius et al. 2018 (mixed precision training); every DAWNBench/MLPerf GPU entry",
        "GPUs with tensor cores, CPUs with native bf16 (AVX-512 BF16, AMX); slower than fp32 where bf16 is "
        "emulated (train.precision=auto then picks fp32, and ablating it changes nothing)",
        "none where native; bf16 rounding of activations", "train.precision (auto, bf16, fp16; fp32: off)",
        lambda r: r.train.precision != "fp32",
        lambda r: _set(r, "train", precision="fp32"),
        stage="train", apply=_mixed_precision),
    Technique(
        "compile",
        "torch.compile of the model: TorchInductor fuses the elementwise work around convolutions and matmuls",
        "PyTorch 2 (Ansel et al. 2024); airbench, nanoGPT",
        "GPUs and long runs, where a step's memory-bound ops dominate; the compile time is inside the clock",
        "compilation at the start of each run (tens of seconds) and at each new input size",
        "train.compile",
        lambda r: r.train.compile,
        lambda r: _set(r, "train", compile=False),
        stage="train", apply=_compile, order=90),
)}


def enabled_techniques(recipe: Recipe) -> list[str]:
    return [t.name for t in TECHNIQUES.values() if t.enabled(recipe)]


def enabled_records(recipe: Recipe) -> list[Technique]:
    return [t for t in TECHNIQUES.values() if t.enabled(recipe)]


def without(recipe: Recipe, names: Iterable[str]) -> Recipe:
    """``recipe`` with each named technique taken out (its record's ``disable``); an unknown name is an error."""
    for name in names:
        if name not in TECHNIQUES:
            raise ConfigError(f"unknown technique {name!r}; known: {', '.join(TECHNIQUES)}")
        recipe = TECHNIQUES[name].disable(recipe)
    return recipe


def unsupported(recipe: Recipe, model: Any) -> list[str]:
    """Names of ``recipe``'s enabled techniques that need something ``model`` (a built module) lacks."""
    return [t.name for t in enabled_records(recipe) if any(not CAPABILITIES[need][0](model) for need in t.needs)]


def check_model(recipe: Recipe, model: Any, *, model_name: str) -> None:
    """Raise ConfigError, naming the missing piece, when an enabled technique needs something ``model``
    (a built module) lacks. Called on a probe model before a run's clock starts."""
    for t in enabled_records(recipe):
        for need in t.needs:
            test, what = CAPABILITIES[need]
            if not test(model):
                raise ConfigError(f"technique {t.name} ({t.switch}) needs a model with {what}; model {model_name} "
                                  f"has none: leave it out with --without {t.name}")
        problem = t.check(recipe, model) if t.check else None
        if problem:
            raise ConfigError(f"{problem} (model {model_name})")


def start(recipe: Recipe) -> None:
    """Apply the enabled ``start`` records, in order: process-wide settings, before data and model exist."""
    for t in sorted((t for t in enabled_records(recipe) if t.stage == "start" and t.apply), key=lambda t: t.order):
        t.apply(recipe)


def assemble(asm: Assembly, stage: Stage) -> None:
    """Apply each enabled record of ``stage`` to ``asm`` in order; hooks they return join ``asm.hooks``."""
    done: set[Callable] = set()
    for t in sorted((t for t in enabled_records(asm.recipe) if t.stage == stage and t.apply), key=lambda t: t.order):
        if t.apply in done:  # mixup and CutMix share one batch mixer
            continue
        done.add(t.apply)
        hook = t.apply(asm)
        if hook is not None:
            asm.hooks.append((t.order, hook))
