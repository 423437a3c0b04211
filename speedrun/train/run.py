"""``speedrun.train``: assemble a recipe into a model, data and hooks, run it against the clock, record it."""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import re
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn

from speedrun import data as datalib
from speedrun.config import ConfigError, Recipe
from speedrun.env import compile_problem, cpu_has_native_bf16, environment
from speedrun.measure.clock import Clock
from speedrun.measure.flops import matmul_peak, train_flops_per_image
from speedrun.models import build_model, check_model_config
from speedrun.store import RunStore, StoreError, new_run_id
from speedrun.techniques.allocator import retain_freed_memory
from speedrun.techniques.averaging import EMA, Lookahead
from speedrun.techniques.freezing import FreezeStem, freeze_, frozen
from speedrun.techniques.label_smoothing import smoothed_cross_entropy
from speedrun.techniques.large_batch import LAMB, LARS, linear_scaled_lr, weight_decay_coefficient
from speedrun.techniques.normalization import apply_norm_options, norm_biases
from speedrun.techniques.mixing import MixBatch
from speedrun.techniques.muon import Muon
from speedrun.techniques.resizing import ProgressiveResize, progressive_sizes
from speedrun.techniques.schedules import LRSchedule
from speedrun.train.hooks import DivergenceGuard, EvalPoint, Evaluator, ProgressBar, TimeBudget
from speedrun.train.loop import FitState, fit


@dataclass(frozen=True)
class Budget:
    """A cap on one run: wall-clock seconds and/or epochs."""

    seconds: float | None = None
    epochs: float | None = None

    @classmethod
    def parse(cls, text: str | float | int | None) -> Budget:
        """``90``, ``90s``, ``2m``, ``1.5h`` are seconds; ``3ep`` (or ``3e``) is epochs."""
        if text is None or isinstance(text, Budget):
            return text or cls()
        if isinstance(text, (int, float)):
            value, unit = float(text), "s"
        else:
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h|e|ep|epochs?)?\s*", text)
            if not m:
                raise ConfigError(f"budget {text!r} not understood; use seconds (90, 90s, 2m, 1h) "
                                  "or epochs (3ep)")
            value, unit = float(m.group(1)), m.group(2) or "s"
        if value <= 0:
            raise ConfigError(f"budget must be > 0; got {text!r}")
        if unit.startswith("e"):
            return cls(epochs=value)
        return cls(seconds=value * {"s": 1, "m": 60, "h": 3600}[unit])


@dataclass
class TrainResult:
    """What one run measured. ``time_to_accuracy_s`` is None unless the target was reached."""

    run_id: str
    recipe: Recipe
    seed: int
    target: float
    outcome: str
    detail: str
    time_to_accuracy_s: float | None
    total_time_s: float  # clock at the end of the run
    train_time_s: float  # total less evaluations
    eval_time_s: float
    prepare_s: float  # one-time dataset preparation, outside the clock (0 when cached)
    best_accuracy: float | None  # None: no evaluation happened (e.g. a time budget ran out first)
    final_accuracy: float | None
    epochs: float
    steps: int
    images_seen: int
    images_per_s: float  # training images per second of train-only time
    flops_per_image: float  # forward + backward
    flops_per_s: float
    peak_flops: float  # measured matmul peak of this device
    mfu: float
    device: str
    torch_version: str
    env: dict
    curve: list[EvalPoint]
    model: nn.Module | None = field(default=None, repr=False)
    store_error: str | None = None  # set when the run could not be recorded

    @property
    def reached(self) -> bool:
        return self.outcome == "reached"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("model", "recipe", "curve", "store_error")}
        return {**d, "recipe": self.recipe.name, "reached": self.reached,
                "curve": [asdict(p) for p in self.curve]}


INIT_IMAGES = 5000  # training images a data-dependent init sees (airbench whitens on 5,000)


def resolve_recipe(recipe: str | Path | Recipe) -> Recipe:
    from speedrun.config import load_toml
    from speedrun.recipes import get_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if str(recipe).endswith(".toml"):
        return load_toml(recipe)
    return get_recipe(str(recipe))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch.cuda.is_available() is False here")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it (else fp16), bf16 on CPUs with native bf16, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Param groups with ``peak_lr`` set (the schedule scales it).

    Groups: weights (decayed; layer-wise adapted by LARS and LAMB); norm parameters and biases
    (decay-free unless ``optim.bn_weight_decay``; never adapted, as in the LARS paper and MLPerf);
    with ``optim.bias_lr_scale``, BatchNorm biases apart at that multiple of the LR. The LR follows
    ``linear_scaled_lr`` and each group's decay ``weight_decay_coefficient``. With ``optim.name=muon``
    the filter banks (more than 2 dims) form a group of their own, orthogonalized, at ``optim.muon_lr``.
    """
    cfg = recipe.optim
    peak_lr = linear_scaled_lr(cfg.lr, batch_size=recipe.train.batch_size, reference_batch_size=cfg.lr_batch_size)
    scaled = {id(p) for p in norm_biases(model)} if cfg.bias_lr_scale != 1.0 else set()
    weights, small, biases = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (biases if id(p) in scaled else small if p.ndim <= 1 else weights).append(p)
    filters = [p for p in weights if p.ndim > 2] if cfg.name == "muon" else []
    weights = [p for p in weights if p.ndim <= 2] if filters else weights
    groups = [dict(params=filters, lr=cfg.muon_lr, peak_lr=cfg.muon_lr, weight_decay=0.0, adapt=False,
                   orthogonal=True)] if filters else []
    for params, lr_scale, decays, adapt in ((weights, 1.0, True, True), (small, 1.0, cfg.bn_weight_decay, False),
                                            (biases, cfg.bias_lr_scale, cfg.bn_weight_decay, False)):
        if params:
            lr = peak_lr * lr_scale
            wd = weight_decay_coefficient(cfg.weight_decay, group_lr=lr, base_lr=peak_lr,
                                          batch_size=recipe.train.batch_size, wd_batch_size=cfg.wd_batch_size)
            groups.append(dict(params=params, lr=lr, peak_lr=lr, weight_decay=wd if decays else 0.0, adapt=adapt))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=peak_lr)
    if cfg.name == "adadelta":
        return torch.optim.Adadelta(groups, lr=peak_lr)
    if cfg.name == "lars":
        return LARS(groups, lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                    trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "lamb":
        return LAMB(groups, lr=peak_lr)
    if cfg.name == "muon":
        return Muon(groups, lr=peak_lr, momentum=cfg.momentum, muon_momentum=cfg.muon_momentum,
                    nesterov=cfg.nesterov)
    raise ConfigError(f"unknown optimizer {cfg.name!r}")


def _store_for(store: RunStore | str | Path | bool | None) -> RunStore | None:
    from speedrun.paths import default_store

    if store is None or store is False:
        return None
    if isinstance(store, RunStore):
        return store
    return RunStore(default_store() if store is True else store)


def train(recipe: str | Path | Recipe = "fashion-mnist", *, data: str | Path | None = None,
          target: float | None = None, seed: int = 0, budget: str | float | Budget | None = None,
          device: str = "auto", threads: int | None = None, store: RunStore | str | Path | bool | None = True,
          progress: bool = False, stop_at_target: bool = True, group_id: str | None = None,
          overrides: Mapping[str, Any] | None = None, **kw_overrides: Any) -> TrainResult:
    """Train ``recipe`` until held-out accuracy reaches ``target`` (default: the recipe's), and time it.

    Overrides are dotted keys (``{"optim.lr": 1.0}``) or keywords with ``__`` for the dot
    (``train__epochs=3``). The run is recorded in ``store`` (the default store, a path, a RunStore,
    or None); a store that cannot be written raises StoreError before training starts.

    >>> result = speedrun.train("fashion-mnist", train__epochs=1, target=0.85)  # doctest: +SKIP
    >>> result.time_to_accuracy_s, result.model  # doctest: +SKIP
    """
    values = dict(overrides or {})
    values.update({k.replace("__", "."): v for k, v in kw_overrides.items()})
    if data is not None:
        values["data.source"] = str(data)
    if target is not None:
        values["target"] = target
    recipe = resolve_recipe(recipe).override(values)
    budget = Budget.parse(budget)
    dev = resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(threads)
    precision = resolve_precision(recipe.train.precision, dev)
    if recipe.train.compile and (problem := compile_problem(dev)):
        raise ConfigError(problem)
    check_model_config(recipe.model)

    # One-time preparation, timed apart from the run.
    if not recipe.data.source:
        raise ConfigError(f"recipe {recipe.name} names no dataset: give one with --data PATH "
                          "(or data.source), e.g. an image-folder tree train/<class>/*.jpg with val/ beside it")
    folder_options = {"max_size": recipe.data.max_size} if recipe.data.max_size else {}
    source = datalib.resolve(recipe.data.source, **folder_options)
    prepared = datalib.prepare(source)

    env = {**environment(dev), "precision": precision}
    run_store = _store_for(store)
    run_id = new_run_id()
    if run_store:
        run_store.start_run(run_id=run_id, recipe_name=recipe.name, recipe=recipe.to_dict(), env=env,
                            target=recipe.target, seed=seed, group_id=group_id)

    clock = Clock(sync=torch.cuda.synchronize if dev.type == "cuda" else None)
    on_point = _point_recorder(run_store, run_id) if run_store else None
    state: FitState | None = None
    evaluator: Evaluator | None = None
    error: str | None = None
    model = None
    # Library start-up belongs with `import torch`, outside the clock: torch.optim imports torch._dynamo
    # when the first optimizer is built (1.5-1.9 s on the 2-core CPU), which otherwise lands in the first
    # run of each process (every `speedrun train`) and not in later ones.
    importlib.import_module("torch._dynamo")
    clock.start()  # MLPerf: before the dataset is touched
    try:
        state, evaluator, model = _run(recipe, prepared, dev, precision, seed, budget, clock, progress,
                                       stop_at_target, on_point)
    except KeyboardInterrupt:
        error = "interrupted before training started"
    except Exception as e:  # recorded as a failed run, never lost
        error = f"{type(e).__name__}: {e}"
        env = {**env, "traceback": traceback.format_exc()}
    total = clock.stop()

    result = _result(run_id, recipe, seed, prepared, state, evaluator, model, clock, total, dev, precision,
                     env, error)
    if run_store:
        try:
            run_store.finish_run(run_id, outcome=result.outcome, detail=result.detail,
                                 summary={k: v for k, v in result.to_dict().items() if k != "curve"},
                                 curve=[asdict(p) for p in result.curve])
        except StoreError as e:  # the training result must not be lost with the store
            result.store_error = str(e)
    return result


def _point_recorder(store: RunStore, run_id: str) -> Callable[[EvalPoint], None]:
    """Writes each evaluation point to the store as it is measured, so a run killed outright keeps
    its curve. A failing write stops the recording, never the run: the final write still records
    the whole curve."""
    failed = False

    def record(point: EvalPoint) -> None:
        nonlocal failed
        if not failed:
            try:
                store.add_point(run_id, asdict(point))
            except StoreError:
                failed = True
    return record


def build_loaders(recipe: Recipe, directory: Path, dev: torch.device, seed: int):
    """``(images, train_loader, test_loader, kind)`` for a prepared cache, as ``train`` uses them.

    ``kind`` is what ``data.loader`` resolved to; ``images`` holds memory maps when it is ``stream``.
    """
    images = datalib.load_prepared(directory, mmap=True)  # reads no pixels yet
    kind = datalib.choose_loader(recipe.data.loader, images.nbytes, dev)
    if kind == "stream" and recipe.data.resize_scale_batch:
        raise ConfigError("data.resize_scale_batch needs the resident loader (the stream loader reads batches "
                          "ahead at a fixed size); the dataset does not fit in memory, or data.loader=stream")
    if kind == "stream":
        make_loader = functools.partial(datalib.StreamLoader, device=dev)
    else:
        images = datalib.load_prepared(directory)

        def make_loader(x, y, **options):
            return datalib.ResidentLoader(torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev), **options)
    common = dict(mean=images.mean, std=images.std, channels_last=recipe.train.channels_last)
    train_loader = make_loader(
        images.train_images, images.train_labels, batch_size=recipe.train.batch_size,
        train=True, seed=seed, flip=recipe.data.flip, alternating_flip=recipe.data.alternating_flip,
        translate_px=recipe.data.translate_px, cutout_px=recipe.data.cutout_px,
        rrc_scale=recipe.data.rrc_scale or None, rrc_ratio=recipe.data.rrc_ratio, **common)
    # Every rank evaluates the whole test set: the evaluator does not all-reduce its counts.
    test_loader = make_loader(images.test_images, images.test_labels, batch_size=recipe.eval.batch_size,
                              train=False, rank=0, world_size=1, **common)
    return images, train_loader, test_loader, kind


@dataclass
class Parts:
    """A recipe assembled for training: what `train` and `lr-find` build alike."""

    images: datalib.ImageSet  # memory maps when the loaders stream
    loader_kind: str  # what data.loader resolved to: resident or stream
    train_loader: datalib.ResidentLoader
    test_loader: datalib.ResidentLoader
    model: nn.Module  # the plain module (its weights, its FLOPs)
    net: nn.Module  # what the loop calls: ``model`` itself or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], ContextManager]
    grad_scaler: torch.amp.GradScaler | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_parts(recipe: Recipe, directory: Path, dev: torch.device, precision: str, seed: int) -> Parts:
    """Loaders, model, optimizer, autocast and loss of ``recipe`` on ``dev``; seeds the global RNG first
    (model initialisation)."""
    torch.manual_seed(seed)
    if recipe.train.retain_memory:
        retain_freed_memory()
    images, train_loader, test_loader, loader_kind = build_loaders(recipe, directory, dev, seed)
    if len(train_loader) == 0:
        raise ConfigError(f"train.batch_size {recipe.train.batch_size} exceeds the {len(images.train_labels)} "
                          "training images")

    model = build_model(recipe.model, in_channels=images.channels, num_classes=images.num_classes,
                        image_size=images.image_size).to(dev)
    apply_norm_options(model, recipe.model)
    if hasattr(model, "init_from_data"):  # data-dependent init (patch whitening): inside the clock, redone each run
        model.init_from_data(train_loader.sample(INIT_IMAGES))
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if recipe.model.stem_train_frac == 0:  # never trained: left out of the optimizer
        freeze_(model.stem_parameters())
    optimizer = build_optimizer(model, recipe)
    net = compile_model(model, recipe, native=min(images.image_size)) if recipe.train.compile else model
    smoothing = recipe.train.label_smoothing
    return Parts(images=images, loader_kind=loader_kind, train_loader=train_loader, test_loader=test_loader,
                 model=model, net=net, optimizer=optimizer,
                 autocast=autocast_for(precision, dev),
                 grad_scaler=torch.amp.GradScaler(dev.type) if precision == "fp16" else None,
                 loss_fn=lambda logits, y: smoothed_cross_entropy(logits, y, smoothing))


def compiled_graphs(recipe: Recipe, native: int) -> int:
    """How many graphs torch.compile builds for a run: one per training image size (progressive
    resizing visits several), one for evaluation (no autograd) and one for its last, smaller batch,
    and one more when the stem freezes mid-run (fewer inputs need a gradient)."""
    d = recipe.data
    sizes = progressive_sizes(native=native, start_scale=d.resize_start_scale, full_frac=d.resize_full_frac)
    return len(sizes) + 2 + (0 < recipe.model.stem_train_frac < 1)


def compile_model(model: nn.Module, recipe: Recipe, *, native: int) -> nn.Module:
    """``torch.compile`` with dynamo's recompile limit raised to cover every input shape of the run.

    Dynamo recompiles on a new input shape and, past its recompile limit (8 by default), silently runs
    the model eagerly from then on. Whether a new size gets a static graph of its own or turns the graph
    dynamic depends on the torch version (2.13 on a CPU compiled each size statically; 2.11 on a GPU went
    dynamic), so the limit is raised to the worst case, one graph per shape (``compiled_graphs``): a
    ResNet-50 resized from 64 to 128 px in 4-px steps meets 17 sizes.
    """
    import torch._dynamo

    limit = compiled_graphs(recipe, native)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    return torch.compile(model)


def autocast_for(precision: str, dev: torch.device) -> Callable[[], ContextManager]:
    """A factory of the forward pass's autocast context: none for fp32.

    Under CPU autocast, convs and linears run in bf16; batch norm is not on autocast's lists, so it
    takes the conv's bf16 output, normalises it with fp32 statistics and fp32 affine parameters,
    updates fp32 running stats and returns bf16 (tests/test_precision.py checks this).
    """
    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, dev.type, dtype=dtype)


def _run(recipe: Recipe, prepared, dev: torch.device, precision: str, seed: int, budget: Budget,
         clock: Clock, progress: bool, stop_at_target: bool,
         on_point: Callable[[EvalPoint], None] | None = None) -> tuple[FitState, Evaluator, nn.Module]:
    parts = build_parts(recipe, prepared.directory, dev, precision, seed)
    images, train_loader, test_loader, model = parts.images, parts.train_loader, parts.test_loader, parts.model

    spe = len(train_loader)
    schedule_steps = max(1, math.ceil(recipe.train.epochs * spe))
    max_steps = schedule_steps if budget.epochs is None else min(schedule_steps, math.ceil(budget.epochs * spe))
    state = FitState(model=parts.net, optimizer=parts.optimizer, autocast=parts.autocast,
                     grad_scaler=parts.grad_scaler, loss_fn=parts.loss_fn, loader=train_loader,
                     schedule_steps=schedule_steps, max_steps=max_steps,
                     step_images=recipe.train.batch_size,  # the schedule counts images
                     extras={"loader": parts.loader_kind})
    ev = recipe.eval
    evaluator = Evaluator(test_loader, clock=clock, target=recipe.target if stop_at_target else None,
                          every_steps=max(1, round(ev.every_epochs * spe)) if ev.every_epochs else 0,
                          every_s=ev.every_s, start_step=math.ceil(ev.start_frac * schedule_steps),
                          tta_flip=ev.tta_flip, tta_translate_px=ev.tta_translate_px, on_point=on_point)
    hooks: list[object] = [LRSchedule(recipe.schedule, momentum=recipe.optim.momentum),
                           DivergenceGuard(1 if dev.type == "cpu" else 25),
                           evaluator]
    if recipe.data.resize_start_scale < 1.0:
        hooks.insert(0, ProgressiveResize(recipe.data, native=min(images.image_size)))
    if recipe.data.mixup_alpha > 0 or recipe.data.cutmix_alpha > 0:
        hooks.insert(0, MixBatch(images.num_classes, mixup_alpha=recipe.data.mixup_alpha,
                                 cutmix_alpha=recipe.data.cutmix_alpha, prob=recipe.data.mix_prob, seed=seed))
    if 0 < recipe.model.stem_train_frac < 1:
        hooks.append(FreezeStem(model.stem_parameters(), after_frac=recipe.model.stem_train_frac))
    if recipe.average.kind == "lookahead":
        # Listed after the evaluator: after_* events run in reverse, so evaluations see averaged weights.
        hooks.append(Lookahead(recipe.average))
    if recipe.average.kind == "ema":  # after the evaluator for the same reason: it hands over the average
        hooks.append(EMA(recipe.average))
    if budget.seconds is not None:
        hooks.append(TimeBudget(budget.seconds, clock))
    if progress:
        hooks.append(ProgressBar(clock))
    fit(state, hooks)
    state.extras["example"] = next(test_loader.epoch(0))[0][:2]
    return state, evaluator, model


def _result(run_id, recipe, seed, prepared, state, evaluator, model, clock, total, dev, precision, env,
            error) -> TrainResult:
    outcome = "failed" if error and "interrupted" not in error else "interrupted" if error else state.outcome
    detail = error or state.detail
    if outcome == "completed":
        best = evaluator.best_accuracy
        outcome = "budget_exhausted"
        detail = (f"schedule of {recipe.train.epochs:g} epochs ended at {best:.2%} < target {recipe.target:.2%}"
                  if state.schedule_step >= state.schedule_steps else
                  f"epoch budget ended at epoch {state.epoch_float:.2f}, best {best:.2%}")
    curve = evaluator.curve if evaluator else []
    if state is not None:
        env = {**env, "loader": state.extras.get("loader")}  # what data.loader=auto resolved to
    train_s = clock.elapsed() - clock.eval_s
    images_seen = state.images_seen if state else 0
    flops = peak = 0.0
    if state is not None and "example" in state.extras:  # counted after the clock stopped
        smoothing = recipe.train.label_smoothing
        example = state.extras.pop("example")

        def count() -> float:
            with state.autocast():
                return train_flops_per_image(model, example, lambda out: smoothed_cross_entropy(
                    out, torch.zeros(len(out), dtype=torch.long, device=out.device), smoothing))

        flops = count()
        frozen_from = state.extras.get("stem_frozen_from_image")
        if frozen_from is not None and images_seen:  # the steps after the stem froze did less work
            with frozen(model.stem_parameters()):
                share = (images_seen - frozen_from) / images_seen
                flops = (1 - share) * flops + share * count()
        flops *= state.extras.get("pixel_fraction", 1.0)  # progressive resizing: mean work per image
        peak_dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
        peak = matmul_peak(dev, env["device_name"], peak_dtype)
    ips = images_seen / train_s if train_s > 0 else 0.0
    return TrainResult(
        run_id=run_id, recipe=recipe, seed=seed, target=recipe.target, outcome=outcome, detail=detail,
        time_to_accuracy_s=evaluator.reached_at if evaluator and outcome == "reached" else None,
        total_time_s=total, train_time_s=train_s, eval_time_s=clock.eval_s, prepare_s=prepared.prepare_s,
        best_accuracy=evaluator.best_accuracy if evaluator and evaluator.curve else None,
        final_accuracy=curve[-1].accuracy if curve else None,
        epochs=state.epoch_float if state else 0.0, steps=state.step if state else 0, images_seen=images_seen,
        images_per_s=ips, flops_per_image=flops, flops_per_s=flops * ips, peak_flops=peak,
        mfu=flops * ips / peak if peak else 0.0, device=env["device_name"], torch_version=torch.__version__,
        env=env, curve=curve, model=model)
