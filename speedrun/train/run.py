"""``speedrun.train``: assemble a recipe into a model, data and hooks, run it against the clock, record it."""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import re
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from speedrun import data as datalib
from speedrun.config import ConfigError, DataConfig, Recipe
from speedrun.data.split import Holdout, holdout
from speedrun.env import compile_problem, environment, resolve_precision
from speedrun.inference import Classifier
from speedrun.measure.clock import Clock
from speedrun.measure.flops import count_train_flops, matmul_peak, precision_dtype
from speedrun.measure.peak import theoretical_peak
from speedrun.models import ModelArg, build_model, check_model_config, check_output, is_import_path, model_label
from speedrun.recipes.sized import NO_TARGET, SIZED, sized_for
from speedrun.store import RESUMABLE, RunStore, StoreError, new_run_id
from speedrun.techniques import registry
from speedrun.techniques.optimizers import build_optimizer
from speedrun.techniques.schedules import LRSchedule
from speedrun.train import checkpoint, distributed
from speedrun.train.assembly import Assembly
from speedrun.train.hooks import DivergenceGuard, EvalPoint, Evaluator, ProgressBar, TimeBudget, evaluate
from speedrun.train.loop import FitState, fit

# Fit-hook positions of the trainer's own hooks, among the techniques' (speedrun.techniques.registry).
ORDER_SCHEDULE, ORDER_GUARD, ORDER_EVAL, ORDER_USER, ORDER_BUDGET, ORDER_PROGRESS = 30, 40, 50, 85, 90, 95
ORDER_CHECKPOINT = 0  # first, so its after_step runs last: a checkpoint holds what every hook did after the step


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
    flops_per_image: float  # forward + backward, as counted: multiplications by conv zero padding included
    flops_per_s: float  # counted FLOPs per second of train-only time
    peak_flops: float  # measured matmul peak of this device, in the run's precision
    mfu: float  # useful FLOP/s over the measured peak
    device: str
    torch_version: str
    env: dict
    curve: list[EvalPoint]
    useful_flops_per_image: float = 0.0  # counted less the multiplications by zero padding
    useful_flops_per_s: float = 0.0
    theoretical_peak_flops: float | None = None  # cores x clock x FLOP/cycle, or a GPU's datasheet
    theoretical_peak: str = ""  # how it was computed
    mfu_theoretical: float | None = None  # useful FLOP/s over the theoretical peak
    model: nn.Module | None = field(default=None, repr=False)  # the trained network, in eval mode
    classifier: Classifier | None = field(default=None, repr=False)  # the model with its data's conventions
    store_error: str | None = None  # set when the run could not be recorded
    # With a validation split (data.val_frac): the final model's accuracy on each split, measured after
    # the clock stopped (the judged split's is its last evaluation when that was of the final model).
    # test_accuracy is None when the run may not read the test split (speedrun tune's trials).
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    resumes: int = 0  # times the run was continued from a checkpoint (its clock carries the time before)
    checkpoints_written: int = 0  # over the whole run, resumes included (speedrun.train.checkpoint)
    checkpoint_s: float = 0.0  # spent writing them, inside the clock
    checkpoint_bytes: int = 0  # size of the last one
    checkpoint_error: str | None = None  # a checkpoint that could not be written

    @property
    def reached(self) -> bool:
        return self.outcome == "reached"

    def predict(self, images) -> torch.Tensor:
        """Class probabilities (N, classes) for uint8 images, or floats in [0, 1], normalized and
        test-time augmented as the run's evaluations were (``Classifier.predict``)."""
        return self._trained().predict(images)

    def save(self, path: str | Path) -> Path:
        """Save the trained model for ``speedrun.load`` / ``speedrun predict`` (``Classifier.save``)."""
        return self._trained().save(path)

    def _trained(self) -> Classifier:
        if self.classifier is None:
            raise ConfigError(f"run {self.run_id} has no trained model ({self.outcome}: {self.detail})")
        return self.classifier

    def to_dict(self) -> dict[str, Any]:
        skip = ("model", "classifier", "recipe", "curve", "store_error")
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}
        return {**d, "recipe": self.recipe.name, "reached": self.reached,
                "curve": [asdict(p) for p in self.curve]}


INIT_IMAGES = 5000  # training images a data-dependent init sees (airbench whitens on 5,000)
REMEASURE_PEAK_AFTER_S = 10.0  # training seconds after which a run measures the matmul peak again


def resolve_recipe(recipe: str | Path | Recipe) -> Recipe:
    from speedrun.recipes import get_recipe, load_toml

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


def _store_for(store: RunStore | str | Path | bool | None) -> RunStore | None:
    from speedrun.paths import default_store

    if store is None or store is False:
        return None
    if isinstance(store, RunStore):
        return store
    return RunStore(default_store() if store is True else store)


def _open_resume(run_id: str, store: RunStore | str | Path | bool | None, device: str, model: ModelArg, *,
                 changes: bool) -> checkpoint.Resume:
    """The run to resume and its checkpoint, or a one-line error: what a resume cannot take is refused."""
    if changes:
        raise ConfigError(f"a resumed run continues as it was recorded: run {run_id} takes no recipe overrides, "
                          "data, target or techniques left out")
    run_store = _store_for(store)
    if run_store is None:
        raise ConfigError(f"resuming run {run_id} needs the run store that recorded it")
    resumed = checkpoint.open_resume(run_store, run_id)
    if device != "auto" and resolve_device(device).type != resumed.device:
        raise ConfigError(f"run {resumed.run_id} trained on {resumed.device}: it resumes there "
                          f"(--device {resumed.device}), where its random generators' states apply")
    recorded = resumed.run["recipe"]["model"]["name"]
    if model is not None and model_label(model) != recorded:
        raise ConfigError(f"run {resumed.run_id} was trained with model {recorded}, not {model_label(model)}")
    return resumed


def _resume_note(resumed: checkpoint.Resume) -> dict[str, Any]:
    """What the store's env keeps of each resume: when, and from which step and clock time."""
    fit = resumed.payload["fit"]["counters"]
    return {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "step": fit["step"],
            "epoch": fit["epoch"], "clock_s": resumed.payload["clock"]["elapsed_s"],
            "checkpoint_written_at": resumed.payload["written_at"], "from_outcome": resumed.run["outcome"]}


def train(recipe: str | Path | Recipe = "fashion-mnist", *, model: ModelArg = None, data: str | Path | None = None,
          target: float | None = None, seed: int = 0, budget: str | float | Budget | None = None,
          device: str = "auto", threads: int | None = None, store: RunStore | str | Path | bool | None = True,
          progress: bool = False, stop_at_target: bool = True, group_id: str | None = None,
          without: Sequence[str] = (), hooks: Sequence[object] = (), read_test: bool = True,
          resume: str | None = None,
          overrides: Mapping[str, Any] | None = None, **kw_overrides: Any) -> TrainResult:
    """Train ``recipe`` until held-out accuracy reaches ``target`` (default: the recipe's), and time it.

    ``model``: the recipe's own (None), a registered name, an import path ``package.module:factory``,
    a factory called as ``factory(in_channels=, num_classes=, image_size=)``, or an ``nn.Module``
    (trained in place, from its own initialisation: the seed then sets data order and augmentation).
    ``without`` names catalog techniques to take out of the recipe; ``hooks`` are fit hooks of your
    own (objects with methods named after the loop's events), run after the techniques' hooks.
    ``read_test=False`` keeps the test split unread (a search judging on ``eval.split=val``): no test
    accuracy is reported then.
    Overrides are dotted keys (``{"optim.lr": 1.0}``) or keywords with ``__`` for the dot
    (``train__epochs=3``). The run is recorded in ``store`` (the default store, a path, a RunStore,
    or None); a store that cannot be written raises StoreError before training starts.

    ``resume``: the id of an interrupted, lost or failed run of ``store`` to continue from its checkpoint
    (``speedrun.train.checkpoint``), in the same store row; its recipe, seed, target and budget are the
    recorded ones, so ``recipe``, overrides, ``data``, ``target`` and ``without`` are not taken. Its clock
    carries the time before (the dead time between is not counted). ``model`` and ``hooks`` must be
    given again as the run was started, when it was started with them.

    >>> result = speedrun.train("fashion-mnist", train__epochs=1, target=0.85)  # doctest: +SKIP
    >>> result.time_to_accuracy_s, result.predict(images)  # doctest: +SKIP
    """
    values = dict(overrides or {})
    values.update({k.replace("__", "."): v for k, v in kw_overrides.items()})
    resumed: checkpoint.Resume | None = None
    if resume is not None:
        resumed = _open_resume(resume, store, device, model, changes=bool(values or without) or data is not None
                               or target is not None)
        recipe, seed, group_id, device = resumed.recipe, resumed.run["seed"], resumed.run["group_id"], resumed.device
        settings = resumed.payload["settings"]
        budget, stop_at_target = Budget(**settings["budget"]), settings["stop_at_target"]
        model = None if isinstance(model, str) else model  # the recorded model.name stands
    # Under torchrun: join the job (speedrun.train.distributed); rank 0 prepares the data and keeps the record.
    world = distributed.init(resolve_device(device).type)
    if resumed and (saved := resumed.payload["settings"].get("world_size", 1)) != (world.world_size if world else 1):
        raise ConfigError(f"run {resumed.run_id} trained in {saved} process(es), each with its share of the batch and "
                          f"its place in the epoch: resume it with as many (--nproc {saved}, or torchrun)")
    if data is not None:
        values["data.source"] = str(data)
    if target is not None:
        values["target"] = target
    if model is not None:
        values["model.name"] = model_label(model)
    prepared: datalib.Prepared | None = None
    sized = resumed is None and not isinstance(recipe, Recipe) and str(recipe) == SIZED
    if sized:  # made from the data's shape: the data is prepared first (timed as ever, outside the clock)
        data_config = Recipe(name=SIZED).override({k: v for k, v in values.items() if k.startswith("data.")}).data
        prepared, mapped = prepare_data(data_config)
        recipe = sized_for(mapped, source=data_config.source)
        if changed := {k: v for k, v in values.items() if k not in ("target", "model.name") and not k.startswith("data.")}:
            recipe = replace(recipe, description=f"{recipe.description}; then set: "
                                                 + ", ".join(f"{k}={v}" for k, v in changed.items()))
    recipe = registry.without(resolve_recipe(recipe).override(values), without)
    budget = Budget.parse(budget)
    dev = resolve_device(device) if world is None else world.device
    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(threads)
    precision = resolve_precision(recipe.train.precision, dev)
    if recipe.train.compile and (problem := compile_problem(dev)):
        raise ConfigError(problem)
    check_model_config(recipe.model)
    source_model = None if model is None or isinstance(model, str) else model

    # One-time preparation, timed apart from the run.
    if not recipe.data.source:
        raise ConfigError(f"recipe {recipe.name} names no dataset: give one with --data PATH "
                          "(or data.source), e.g. an image-folder tree train/<class>/*.jpg with val/ beside it")
    if prepared is None:
        prepared, mapped = prepare_data(recipe.data)
    recipe = check_run(recipe, mapped, source_model, adapt=sized)
    if world is not None:
        check_job(recipe, world)

    env = {**environment(dev), "precision": precision}
    if recipe.data.val_frac:  # recorded when the run starts: the same rows for every seed (speedrun.data.split)
        env["val_split"] = holdout(mapped.train_labels, recipe.data.val_frac).describe()
    run_store = None if world and not world.is_main else resumed.store if resumed else _store_for(store)
    run_id = resumed.run_id if resumed else new_run_id()
    if world is not None:  # one run in the store per job: rank 0's id, with every rank's host and process
        run_id = distributed.broadcast_object(world, run_id)
        env["distributed"] = world.describe()
        progress = progress and world.is_main
    store_problem = None
    try:
        if resumed and run_store:  # the same row, running again; what the run recorded before is kept
            env = {**env, "resumed": [*resumed.run["env"].get("resumed", []), _resume_note(resumed)]}
            run_store.resume_run(resumed.run, env=env, curve=resumed.payload["curve"])
        elif run_store:
            run_store.start_run(run_id=run_id, recipe_name=recipe.name, recipe=recipe.to_dict(), env=env,
                                target=recipe.target, seed=seed, group_id=group_id)
    except StoreError as e:
        store_problem = str(e)
    if world is not None:  # every rank raises rank 0's store error, or none does
        store_problem = distributed.broadcast_object(world, store_problem)
    if store_problem:
        raise StoreError(store_problem)

    clock = Clock(sync=torch.cuda.synchronize if dev.type == "cuda" else None)
    checkpointer = None
    if run_store and recipe.train.checkpoint_every_s > 0:
        checkpointer = checkpoint.Checkpointer(
            run_store.checkpoint_path(run_id), every_s=recipe.train.checkpoint_every_s, clock=clock,
            settings={"budget": asdict(budget), "stop_at_target": stop_at_target, "device": dev.type,
                      "world_size": 1 if world is None else world.world_size},
            **(resumed.payload["checkpoints"] if resumed else {}))
    on_point = _point_recorder(run_store, run_id) if run_store else None
    state: FitState | None = None
    evaluator: Evaluator | None = None
    parts: Parts | None = None
    error: str | None = None
    # Library start-up belongs with `import torch`, outside the clock: torch.optim imports torch._dynamo
    # when the first optimizer is built (1.5-1.9 s on the 2-core CPU), which otherwise lands in the first
    # run of each process (every `speedrun train`) and not in later ones.
    importlib.import_module("torch._dynamo")
    if world is not None:
        distributed.barrier(world)  # the ranks start together: rank 0's clock is the job's
    clock.start()  # MLPerf: before the dataset is touched
    if resumed:
        clock.carry(resumed.elapsed_s, resumed.eval_s)
    where = "" if world is None else f" (rank {world.rank} of a {world.world_size}-process job)"
    try:
        try:
            parts = build_parts(recipe, prepared.directory, dev, precision, seed, model=source_model,
                                read_test=read_test)
            state, evaluator = _fit(recipe, parts, dev, budget, clock, progress, stop_at_target, on_point,
                                    hooks, checkpointer=checkpointer,
                                    resume=resumed.payload["fit"] if resumed else None, world=world)
        except KeyboardInterrupt:
            error = "interrupted before training started"
        except Exception as e:  # recorded as a failed run, never lost
            error = f"{type(e).__name__}{where}: {e}"
            env = {**env, "traceback": traceback.format_exc()}
        distributed.hold_termination()  # from here on the outcome is being recorded: torchrun's SIGTERM waits
    except distributed.Terminated as e:  # torchrun's SIGTERM while a lost rank's error was being handled
        error = error or f"{type(e).__name__}{where}: {e}"
    total = clock.stop()

    result = _result(run_id, recipe, seed, prepared, state, evaluator, parts, clock, total, dev, precision,
                     env, error, world_size=1 if world is None else world.world_size)
    result.resumes = resumed.run["resumes"] + 1 if resumed else 0
    if checkpointer:
        result.checkpoints_written, result.checkpoint_s = checkpointer.written, checkpointer.seconds
        result.checkpoint_bytes, result.checkpoint_error = checkpointer.bytes, checkpointer.error
        if result.outcome not in RESUMABLE and not recipe.train.keep_checkpoint:  # ended by itself
            checkpoint.remove(checkpointer.path)
    if run_store:
        try:
            run_store.finish_run(run_id, outcome=result.outcome, detail=result.detail,
                                 summary={k: v for k, v in result.to_dict().items() if k != "curve"},
                                 curve=[asdict(p) for p in result.curve])
        except StoreError as e:  # the training result must not be lost with the store
            result.store_error = str(e)
    if world is not None:
        distributed.finish(world)  # the other ranks exit after rank 0 has recorded the job
    return result


def resume_or_train(store: RunStore, run_id: str | None, *args: Any, **kwargs: Any) -> TrainResult:
    """Continue stored run ``run_id`` from its checkpoint when it can be (``checkpoint.resume_problem``),
    else ``train(*args, **kwargs)`` afresh: how ``ablate`` (and a tuner) redo a run an interruption cut
    short without repeating its work. A resume takes only ``device``, ``threads``, ``progress``, ``model``
    and ``hooks`` of ``kwargs``; the recipe, seed and budget are the run's own."""
    if run_id is not None:
        try:
            run = store.get_run(run_id)
        except StoreError:
            run = None
        if run is not None and checkpoint.resume_problem(run) is None:
            keep = ("device", "threads", "progress", "model", "hooks")
            return train(resume=run["id"], store=store, **{k: v for k, v in kwargs.items() if k in keep})
    return train(*args, store=store, **kwargs)


def prepare_data(data: DataConfig) -> tuple[datalib.Prepared, datalib.ImageSet]:
    """One-time preparation of ``data.source`` (cached; timed in ``prepare_s``), and the cache memory-mapped.
    In a job rank 0 prepares it first and the other ranks then find it prepared (one machine, or a
    shared SPEEDRUN_HOME)."""
    world = distributed.current()
    if world is not None and not world.is_main:
        distributed.barrier(world)
    try:
        prepared = datalib.prepare(datalib.resolve(data.source, **datalib.source_options(data)))
    finally:
        if world is not None and world.is_main:
            distributed.barrier(world)
    return prepared, datalib.load_prepared(prepared.directory, mmap=True)


def check_job(recipe: Recipe, world: distributed.World) -> None:
    """Refuse what a data-parallel job cannot run as the recipe says: ``train.batch_size`` is the global
    batch, shared evenly among the ranks."""
    n, b = world.world_size, recipe.train.batch_size
    if b % n:
        raise ConfigError(f"train.batch_size {b} is the global batch, shared among {n} processes: set a multiple of "
                          f"{n} (e.g. --set train.batch_size={max(n, b - b % n)})")
    if recipe.model.sync_bn and world.device.type != "cuda":
        raise ConfigError("model.sync_bn needs GPUs: torch's SyncBatchNorm does not run on the CPU "
                          "(leave it off: each rank then normalizes with its own share's statistics)")


def check_run(recipe: Recipe, images: datalib.ImageSet, model: Callable[..., nn.Module] | nn.Module | None, *,
              adapt: bool = False) -> Recipe:
    """Refuse, before the clock starts, what would only fail inside it: a batch larger than the training
    set, a model that does not fit the data, a technique the model lacks the structure for. Returns
    ``recipe``; with ``adapt`` (a default recipe, not one the user chose) the techniques the model lacks
    the structure for are left out instead, and its description says so.

    The model is checked on a probe built here (on the CPU, from the same factory), so a run's own model
    is still built inside the clock; a user's module is checked as it is.
    """
    n = len(images.train_labels)
    if recipe.data.val_frac:
        n = len(holdout(images.train_labels, recipe.data.val_frac).train_rows)
    if recipe.train.batch_size > n:
        raise ConfigError(f"train.batch_size {recipe.train.batch_size} exceeds the {n:,} training images; "
                          f"set --set train.batch_size={min(n, 256)} or smaller")
    dims = dict(in_channels=images.channels, num_classes=images.num_classes, image_size=images.image_size)
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation must not move the global RNG
        probe = model if isinstance(model, nn.Module) else build_model(recipe.model, factory=model, **dims)
    if model is not None or is_import_path(recipe.model.name):  # registered models are known to fit
        check_output(probe, recipe.model.name, **dims)
    if adapt and (left_out := registry.unsupported(recipe, probe)):
        recipe = registry.without(recipe, left_out)
        recipe = replace(recipe, description=f"{recipe.description}; left out for model {recipe.model.name}: "
                                             f"{', '.join(left_out)}")
    registry.check_model(recipe, probe, model_name=recipe.model.name)
    return recipe


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


@dataclass
class Loaders:
    """What ``build_loaders`` makes of a prepared cache."""

    images: datalib.ImageSet  # memory maps: the loaders hold their own copies (or read the maps: stream)
    train: datalib.ResidentLoader  # the training split, less the hold-out when data.val_frac > 0
    test: datalib.ResidentLoader | None  # None when the test split must not be read (read_test=False)
    val: datalib.ResidentLoader | None  # the hold-out, when data.val_frac > 0
    kind: str  # what data.loader resolved to: resident, stream or decode
    holdout: Holdout | None


def build_loaders(recipe: Recipe, directory: Path, dev: torch.device, seed: int, *,
                  read_test: bool = True) -> Loaders:
    """The train, test and validation loaders of a prepared cache, as ``train`` uses them.

    With ``data.val_frac`` the training arrays are split (``speedrun.data.split``: stratified, the same
    rows for every seed) into what trains and what validates. With ``read_test=False`` (a search) no
    test pixel or label is read from the cache.
    """
    images = datalib.load_prepared(directory, mmap=True)  # reads no pixels yet
    if not read_test and recipe.eval.split == "test":
        raise ConfigError("this run may not read the test split, but its target is judged on it (eval.split=test)")
    held = holdout(images.train_labels, recipe.data.val_frac) if recipe.data.val_frac else None
    if images.layout != "square":  # images of their own sizes: crops made per batch (data/crops.py)
        images, train, test, val, kind = datalib.crop_loaders(recipe, images, directory, dev, seed, holdout=held,
                                                              read_test=read_test)
        return Loaders(images, train, test, val, kind, held)
    kind = datalib.choose_loader(recipe.data.loader, images.nbytes, dev)
    if kind == "stream" and recipe.data.resize_scale_batch:
        raise ConfigError("data.resize_scale_batch needs the resident loader (the stream loader reads batches "
                          "ahead at a fixed size); the dataset does not fit in memory, or data.loader=stream")
    if kind == "stream" and recipe.data.val_frac:
        raise ConfigError("data.val_frac needs the resident loader (the stream loader reads the training arrays "
                          "in place); the dataset does not fit in memory, or data.loader=stream")
    if kind == "stream":
        make_loader = functools.partial(datalib.StreamLoader, device=dev)
    else:
        def make_loader(x, y, **options):  # read the maps (or take the rows already gathered) into memory
            x, y = (a if type(a) is np.ndarray else np.array(a) for a in (x, y))
            return datalib.ResidentLoader(torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev), **options)
    train_x, train_y = images.train_images, images.train_labels
    if held is not None:  # rows in file order: a sequential read of the maps
        train_x, train_y = train_x[held.train_rows], train_y[held.train_rows]
    common = dict(mean=images.mean, std=images.std, channels_last=recipe.train.channels_last)
    train_loader = make_loader(
        train_x, train_y, batch_size=recipe.train.batch_size // datalib.process_shard()[1],  # this rank's share
        train=True, seed=seed, flip=recipe.data.flip, alternating_flip=recipe.data.alternating_flip,
        translate_px=recipe.data.translate_px, cutout_px=recipe.data.cutout_px,
        rrc_scale=recipe.data.rrc_scale or None, rrc_ratio=recipe.data.rrc_ratio, **common)
    # Each rank evaluates its share of the split; the evaluator all-reduces the counts (train.hooks.evaluate).
    evaluation = dict(batch_size=recipe.eval.batch_size, train=False, **common)
    test_loader = make_loader(images.test_images, images.test_labels, **evaluation) if read_test else None
    val_loader = None if held is None else make_loader(images.train_images[held.val_rows],
                                                       images.train_labels[held.val_rows], **evaluation)
    return Loaders(images, train_loader, test_loader, val_loader, kind, held)


@dataclass
class Parts:
    """A recipe assembled for training: what `train` and `lr-find` build alike."""

    images: datalib.ImageSet  # memory maps when the loaders stream
    loader_kind: str  # what data.loader resolved to: resident or stream
    train_loader: datalib.ResidentLoader
    test_loader: datalib.ResidentLoader | None  # None when the test split may not be read
    model: nn.Module  # the plain module (its weights, its FLOPs)
    net: nn.Module  # what the loop calls: ``model`` itself or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], ContextManager]
    grad_scaler: torch.amp.GradScaler | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hooks: list[tuple[int, object]]  # the techniques' fit hooks, with their order
    val_loader: datalib.ResidentLoader | None = None  # the hold-out of data.val_frac
    holdout: Holdout | None = None

    def eval_loader(self, split: str) -> datalib.ResidentLoader | None:
        return self.val_loader if split == "val" else self.test_loader


def build_parts(recipe: Recipe, directory: Path, dev: torch.device, precision: str, seed: int, *,
                model: Callable[..., nn.Module] | nn.Module | None = None, read_test: bool = True) -> Parts:
    """Loaders, model, optimizer, autocast, loss and technique hooks of ``recipe`` on ``dev``; seeds the
    global RNG first (model initialisation). ``model``: a factory or a module in place of the recipe's.

    The enabled techniques are applied in three stages: process-wide settings first
    (``registry.start``), then (``registry.assemble``) to the built model before the optimizer collects
    its parameters, then to the rest once the optimizer exists.
    """
    registry.start(recipe)
    torch.manual_seed(seed)
    loaders = build_loaders(recipe, directory, dev, seed, read_test=read_test)
    images, train_loader = loaders.images, loaders.train
    dims = dict(in_channels=images.channels, num_classes=images.num_classes, image_size=images.image_size)
    net = model if isinstance(model, nn.Module) else build_model(recipe.model, factory=model, **dims)
    asm = Assembly(recipe=recipe, device=dev, precision=precision, seed=seed, num_classes=images.num_classes,
                   image_size=images.image_size, train_loader=train_loader, model=net.to(dev), init_images=INIT_IMAGES)
    registry.assemble(asm, "model")
    world = distributed.current()
    if world is not None and recipe.model.sync_bn:  # before the optimizer: it keeps the same parameters
        asm.model = nn.SyncBatchNorm.convert_sync_batchnorm(asm.model)
    asm.optimizer = build_optimizer(asm.model, recipe)
    if world is not None:  # before torch.compile (train stage), which then compiles DDP's forward
        asm.net = distributed.wrap(asm.model, world, freezes=0 < recipe.model.stem_train_frac < 1
                                   or any(f < 1 for f in recipe.model.block_train_fracs))
    else:
        asm.net = asm.model
    registry.assemble(asm, "train")
    return Parts(images=images, loader_kind=loaders.kind, train_loader=train_loader, test_loader=loaders.test,
                 model=asm.model, net=asm.net, optimizer=asm.optimizer, autocast=asm.autocast,
                 grad_scaler=asm.grad_scaler, loss_fn=asm.loss_fn, hooks=asm.hooks, val_loader=loaders.val,
                 holdout=loaders.holdout)


def _fit(recipe: Recipe, parts: Parts, dev: torch.device, budget: Budget, clock: Clock, progress: bool,
         stop_at_target: bool, on_point: Callable[[EvalPoint], None] | None,
         user_hooks: Sequence[object], *, checkpointer: checkpoint.Checkpointer | None = None,
         resume: Mapping[str, Any] | None = None, world: distributed.World | None = None
         ) -> tuple[FitState, Evaluator]:
    """Run the fit; ``resume``: the fit state of a checkpoint to continue from (``checkpoint.snapshot``).
    In a job (``world``) the time budget is judged on rank 0's clock and every rank stops with it
    (``distributed.Agreement``); the steps count each rank's share of the global batch."""
    spe = len(parts.train_loader)
    schedule_steps = max(1, math.ceil(recipe.train.epochs * spe))
    max_steps = schedule_steps if budget.epochs is None else min(schedule_steps, math.ceil(budget.epochs * spe))
    state = FitState(model=parts.net, optimizer=parts.optimizer, autocast=parts.autocast,
                     grad_scaler=parts.grad_scaler, loss_fn=parts.loss_fn, loader=parts.train_loader,
                     schedule_steps=schedule_steps, max_steps=max_steps,
                     step_images=parts.train_loader.batch_size,  # the schedule counts images (this rank's)
                     extras={"loader": parts.loader_kind})
    ev = recipe.eval
    evaluator = Evaluator(parts.eval_loader(ev.split), clock=clock, target=recipe.target if stop_at_target and recipe.target < NO_TARGET else None,
                          every_steps=max(1, round(ev.every_epochs * spe)) if ev.every_epochs else 0,
                          every_s=ev.every_s, start_step=math.ceil(ev.start_frac * schedule_steps),
                          tta_flip=ev.tta_flip, tta_translate_px=ev.tta_translate_px, on_point=on_point,
                          agree=None if world is None else functools.partial(distributed.agree, world))
    hooks = [*parts.hooks, (ORDER_SCHEDULE, LRSchedule(recipe.schedule, momentum=recipe.optim.momentum)),
             (ORDER_GUARD, DivergenceGuard(1 if dev.type == "cpu" else 25)), (ORDER_EVAL, evaluator),
             *((ORDER_USER, h) for h in user_hooks)]
    if budget.seconds is not None and (world is None or world.is_main):
        hooks.append((ORDER_BUDGET, TimeBudget(budget.seconds, clock)))
    if progress:
        hooks.append((ORDER_PROGRESS, ProgressBar(clock)))
    if checkpointer is not None:
        hooks.append((ORDER_CHECKPOINT, checkpointer))
    ordered = [h for _, h in sorted(hooks, key=lambda pair: pair[0])]  # stable: equal orders keep their order
    if checkpointer is not None:
        checkpointer.bind(ordered, lambda: [asdict(p) for p in evaluator.curve])
    looped: list[object] = ordered
    if world is not None:  # a stop any one rank decides waits for the next batch, where all ranks take it
        agreement = distributed.Agreement(world)
        looped = [h if h is evaluator else agreement.defer(h) for h in ordered] + [agreement]
    fit(state, looped, restore=None if resume is None else functools.partial(checkpoint.restore, hooks=ordered,
                                                                               saved=resume))
    state.extras["example"] = parts.train_loader.example(2)
    return state, evaluator


def _count_flops(parts: Parts, state: FitState) -> tuple[float, float]:
    """(counted, useful) forward+backward FLOPs per training image, as the run's steps did them on
    average: steps after a hook froze parameters (``extras["freezes"]``: ``(images seen then, a context
    that freezes them again)``, from stem- and layer-freezing) do less work, and progressive resizing
    (``extras["pixel_fraction"]``) trains on fewer pixels."""
    example = state.extras.pop("example")
    model = parts.model

    def count() -> tuple[float, float]:
        with state.autocast():
            return count_train_flops(model, example, lambda out: parts.loss_fn(
                out, torch.zeros(len(out), dtype=torch.long, device=out.device)))

    freezes = sorted(state.extras.get("freezes", ()), key=lambda f: f[0])
    if not freezes:
        flops, useful = count()
    else:  # stretch i of the run trained with the first i freezes in force
        seen = max(state.images_seen, 1)
        bounds = [0, *(start for start, _ in freezes), seen]
        flops = useful = 0.0
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if b > a:
                with contextlib.ExitStack() as stack:
                    for _, freeze in freezes[:i]:
                        stack.enter_context(freeze())
                    f, u = count()
                flops, useful = flops + (b - a) / seen * f, useful + (b - a) / seen * u
    pixels = state.extras.get("pixel_fraction", 1.0)  # progressive resizing: mean work per image
    return flops * pixels, useful * pixels


def _result(run_id, recipe, seed, prepared, state, evaluator, parts, clock, total, dev, precision, env,
            error, *, world_size: int = 1) -> TrainResult:
    """The run's figures; in a job of ``world_size`` ranks, images and FLOP/s are the job's (every rank
    trained as many images as this one), its peak that many devices'."""
    outcome = "failed" if error and "interrupted" not in error else "interrupted" if error else state.outcome
    detail = error or state.detail
    if outcome == "completed" and recipe.target >= NO_TARGET and state.schedule_step >= state.schedule_steps:
        final = evaluator.curve[-1].accuracy if evaluator.curve else None
        detail = (f"completed its {recipe.train.epochs:.3g} epochs" + (f" at {final:.2%}" if final is not None else "")
                  + " (no target set)")
    elif outcome == "completed":
        best = evaluator.best_accuracy
        outcome = "budget_exhausted"
        detail = (f"schedule of {recipe.train.epochs:g} epochs ended at {best:.2%} < target {recipe.target:.2%}"
                  if state.schedule_step >= state.schedule_steps else
                  f"epoch budget ended at epoch {state.epoch_float:.2f}, best {best:.2%}")
    curve = evaluator.curve if evaluator else []
    if state is not None:
        env = {**env, "loader": state.extras.get("loader")}  # what data.loader=auto resolved to
    train_s = clock.elapsed() - clock.eval_s
    images_seen = state.images_seen * world_size if state else 0
    flops = useful = peak = 0.0
    theory = None
    if state is not None and "example" in state.extras:  # counted after the clock stopped
        flops, useful = _count_flops(parts, state)
        sustained = useful * images_seen / train_s / world_size if train_s > 0 else 0.0  # per process
        # A run long enough to make its MFU worth reading measures the peak again (outside the clock;
        # a fraction of a second), so the cached peak tends to the device's best, not one moment's.
        peak = matmul_peak(dev, env["device_name"], precision_dtype(precision), at_least=sustained,
                           remeasure=train_s >= REMEASURE_PEAK_AFTER_S) * world_size
        theory = theoretical_peak(dev.type, env["device_name"], precision, threads=torch.get_num_threads())
        if theory is not None and world_size > 1:  # the job's: every rank's device or cores
            theory = replace(theory, flops=theory.flops * world_size, how=f"{world_size} processes x ({theory.how})")
    model = classifier = None
    if parts is not None and state is not None:  # trained, however far
        model = parts.model.eval()
        images, ev = parts.images, recipe.eval
        classifier = Classifier(model, classes=images.classes, mean=images.mean, std=images.std,
                                image_size=parts.eval_loader(ev.split).image_size, tta_flip=ev.tta_flip,
                                tta_translate_px=ev.tta_translate_px,
                                channels_last=recipe.train.channels_last, precision=precision,
                                recipe=recipe.to_dict(), info={"run_id": run_id, "seed": seed,
                                                               "dataset": images.name, "outcome": outcome,
                                                               "accuracy": curve[-1].accuracy if curve else None})
    ips = images_seen / train_s if train_s > 0 else 0.0
    stopped = outcome in ("failed", "interrupted")
    split_accuracy = {} if stopped else _split_accuracies(recipe, parts, state, curve)
    return TrainResult(
        run_id=run_id, recipe=recipe, seed=seed, target=recipe.target, outcome=outcome, detail=detail,
        time_to_accuracy_s=evaluator.reached_at if evaluator and outcome == "reached" else None,
        total_time_s=total, train_time_s=train_s, eval_time_s=clock.eval_s, prepare_s=prepared.prepare_s,
        best_accuracy=evaluator.best_accuracy if evaluator and evaluator.curve else None,
        final_accuracy=curve[-1].accuracy if curve else None,
        epochs=state.epoch_float if state else 0.0, steps=state.step if state else 0, images_seen=images_seen,
        images_per_s=ips, flops_per_image=flops, flops_per_s=flops * ips, peak_flops=peak,
        mfu=useful * ips / peak if peak else 0.0, useful_flops_per_image=useful, useful_flops_per_s=useful * ips,
        theoretical_peak_flops=theory.flops if theory else None, theoretical_peak=theory.how if theory else "",
        mfu_theoretical=useful * ips / theory.flops if theory else None,
        device=env["device_name"], torch_version=torch.__version__,
        env=env, curve=curve, model=model, classifier=classifier, val_accuracy=split_accuracy.get("val"),
        test_accuracy=split_accuracy.get("test"))


def _split_accuracies(recipe: Recipe, parts: Parts | None, state: FitState | None,
                      curve: list[EvalPoint]) -> dict[str, float]:
    """With a validation split, the final model's accuracy on val and on test (when it may be read),
    after the clock: the judged split's last point is reused when it was taken at the last step."""
    if parts is None or state is None or parts.val_loader is None:
        return {}
    model = state.model if state.eval_model is None else state.eval_model
    found = {}
    for split in ("val", "test"):
        loader = parts.eval_loader(split)
        if split == recipe.eval.split and curve and curve[-1].step == state.step:
            found[split] = curve[-1].accuracy
        elif loader is not None:
            found[split] = evaluate(model, loader, tta_flip=recipe.eval.tta_flip,
                                    tta_translate_px=recipe.eval.tta_translate_px, autocast=state.autocast)[0]
    return found
