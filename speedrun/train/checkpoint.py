"""Checkpoints: a run's whole training state, written atomically beside its run store, so that an
interrupted, lost or failed run continues exactly where its last checkpoint left it.

What one holds (``snapshot``): the model's and the optimizer's state (and the fp16 grad scaler's),
the fit's counters (step, epoch, images seen), the training loader's position in its epoch and its
augmentation generator, every hook's ``state_dict()`` (the loop's state protocol: weight averages,
the stem's freezing, progressive resizing, the batch mixer's generator, the evaluator's curve and
tallies), the Python, NumPy, torch and CUDA generators, and the run's clock. A resumed fit restores
all of it after ``before_fit`` (``restore``), so on CPU with the same threads its weights end
bit-identical to an uninterrupted run's. Hooks whose behaviour depends only on the step or the clock
(the LR schedule, the divergence guard, the time budget, the progress bar) hold nothing a resume needs.

Where: ``<folder of the run store>/checkpoints/<run id>.pt`` (``RunStore.checkpoint_path``), one file
per run, replaced by each new checkpoint. It is deleted when the run ends by itself (reached, budget
exhausted, diverged) unless ``train.keep_checkpoint``; an interrupted, lost or failed run keeps it
for ``speedrun train --resume RUN_ID``. Runs not recorded in a store write none.

When: after a step, once ``train.checkpoint_every_s`` seconds of the run's clock have passed since
the previous one (or since the start). The default, 300 s, writes none in runs shorter than five
minutes (every built-in CPU recipe but cifar10-cpu), where a restart costs little, and loses at most
five minutes of a long run; 0 turns them off. Writing is inside the clock, as everything the run
does, and is reported (count, seconds, size).

Atomic: the bytes go to a temporary file in the same folder, are fsynced, and the file is renamed
over the previous checkpoint, then the folder is fsynced; a kill at any moment leaves the previous
checkpoint or the new one, never a torn file. Files are read with ``weights_only=True``: loading one
runs no code from it.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from speedrun.config import ConfigError, Recipe, from_dict
from speedrun.measure.clock import Clock
from speedrun.store import RESUMABLE, RunStore
from speedrun.train.loop import FitState

FORMAT, VERSION = "speedrun-checkpoint", 1
# Test hook: "PHASE:N" pauses the N-th checkpoint write of this process at PHASE (before: nothing
# written yet; during: half of the temporary file written; after: renamed into place), saying so on
# stderr, so a test can kill the process there deterministically.
PAUSE_ENV = "SPEEDRUN_TEST_CHECKPOINT_PAUSE"


# ---------------------------------------------------------------- the state of a fit

def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    from speedrun.train.distributed import plain_module

    return plain_module(model)  # under the torch.compile wrapper and DistributedDataParallel


def stateful_hooks(hooks: Sequence[object]) -> dict[str, object]:
    """The hooks with a ``state_dict``, keyed by position among them and class (``"2.EMA"``)."""
    with_state = [h for h in hooks if callable(getattr(h, "state_dict", None))]
    return {f"{i}.{type(h).__qualname__}": h for i, h in enumerate(with_state)}


def rng_states() -> dict[str, Any]:
    """The process-wide generators: Python's, NumPy's, torch's CPU one and, once CUDA is in use, CUDA's."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
              "torch": torch.get_rng_state(), "cuda": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def snapshot(state: FitState, hooks: Sequence[object]) -> dict[str, Any]:
    """Everything needed to continue the fit exactly after the step just done (tensors are the live
    ones, not copies: serialize before the next step)."""
    return {
        "counters": {"step": state.step, "epoch": state.epoch, "images_seen": state.images_seen},
        "model": _unwrapped(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "grad_scaler": None if state.grad_scaler is None else state.grad_scaler.state_dict(),
        "loader": state.loader.state_dict(),
        "hooks": {key: h.state_dict() for key, h in stateful_hooks(hooks).items()},
        "rng": rng_states(),
    }


def restore(state: FitState, hooks: Sequence[object], saved: Mapping[str, Any]) -> None:
    """Put a fit back where ``snapshot`` took it; called by ``fit`` after ``before_fit`` (``restore=``)."""
    mine = stateful_hooks(hooks)
    if list(mine) != list(saved["hooks"]):
        raise ConfigError(f"the checkpoint holds the state of hooks {', '.join(saved['hooks']) or 'none'}, but this "
                          f"run has {', '.join(mine) or 'none'}: resume it with the hooks it was started with")
    counters = saved["counters"]
    state.step, state.epoch, state.images_seen = counters["step"], counters["epoch"], counters["images_seen"]
    _unwrapped(state.model).load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.grad_scaler is not None and saved["grad_scaler"] is not None:
        state.grad_scaler.load_state_dict(saved["grad_scaler"])
    state.loader.load_state_dict(saved["loader"])
    for key, hook in mine.items():
        hook.load_state_dict(saved["hooks"][key], state)
    set_rng_states(saved["rng"])


# ---------------------------------------------------------------- files

def _pause_at(phase: str, number: int) -> None:
    if os.environ.get(PAUSE_ENV) == f"{phase}:{number}":
        print(f"speedrun-test: checkpoint {number} paused {phase}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview, *, number: int = 0) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old file or the new one, never a part.

    ``number`` counts this process's writes, for the test hook (``PAUSE_ENV``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    _pause_at("before", number)
    try:
        with open(temporary, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if os.environ.get(PAUSE_ENV) == f"during:{number}":
                f.flush()
                _pause_at("during", number)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:  # a failed write (a full disk) or Ctrl-C: the previous checkpoint stands
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # the rename itself must survive a power cut, not only the bytes
    _pause_at("after", number)


def remove(path: Path) -> None:
    """Delete a run's checkpoint and any temporary file a killed writer left beside it; best effort (a
    file that cannot be deleted is left, never an error that would lose the run's result)."""
    with contextlib.suppress(OSError):
        for stale in [path, *path.parent.glob(f"{path.name}.tmp*")]:
            stale.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any]:
    """A checkpoint's payload, its tensors on the CPU (``restore`` copies them into the run's model and
    optimizer, wherever those live); ConfigError when the file is not one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch.load fails in many ways on foreign or damaged bytes
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                          "delete it and start the run again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a speedrun checkpoint")
    if payload.get("version") != VERSION:
        raise ConfigError(f"checkpoint {path} has format version {payload.get('version')}; this speedrun "
                          f"reads version {VERSION}")
    return payload


# ---------------------------------------------------------------- the hook

class Checkpointer:
    """Writes the fit's state to ``path`` after a step, every ``every_s`` seconds of ``clock``.

    Ordered first among the fit hooks, so its ``after_step`` runs after every other hook's (after-events
    run in reverse): the state it saves includes what they did after the step (an evaluation, an
    average). ``bind`` gives it the hooks to save and the curve; ``settings`` are the run's options a
    resume needs besides its store row (the budget, the device type). A write that fails (a full disk,
    a hook's state torch cannot save) is said in ``error`` and no more are tried; the run goes on.
    ``written`` and ``seconds`` start from the counts of the processes of the run before this one.
    """

    def __init__(self, path: Path, *, every_s: float, clock: Clock, settings: Mapping[str, Any],
                 written: int = 0, seconds: float = 0.0) -> None:
        self.path, self.every_s, self.clock, self.settings = path, every_s, clock, dict(settings)
        self.written, self.seconds, self.bytes = written, seconds, 0
        self.error: str | None = None
        self.hooks: list[object] = []
        self.curve: Callable[[], list[dict]] = list
        self._number, self._last_s = 0, 0.0

    def bind(self, hooks: Sequence[object], curve: Callable[[], list[dict]]) -> None:
        self.hooks, self.curve = [h for h in hooks if h is not self], curve

    def before_fit(self, state: FitState) -> None:
        self._last_s = self.clock.elapsed(sync=False)  # a resumed run's clock is carried over already

    def after_step(self, state: FitState) -> None:
        if self.error or state.at_end or self.clock.elapsed(sync=False) - self._last_s < self.every_s:
            return
        self.write(state)

    def write(self, state: FitState) -> None:
        start = time.perf_counter()
        self._number += 1
        payload = {"format": FORMAT, "version": VERSION, "run_id": self.path.stem,
                   "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "clock": {"elapsed_s": self.clock.elapsed(), "eval_s": self.clock.eval_s},
                   "checkpoints": {"written": self.written + 1, "seconds": self.seconds},
                   "settings": self.settings, "curve": self.curve(), "fit": snapshot(state, self.hooks)}
        try:
            buffer = io.BytesIO()
            torch.save(payload, buffer)  # a hook's state torch cannot save fails here, not the run
            data = buffer.getbuffer()
            write_atomic(self.path, data, number=self._number)
        except Exception as e:  # a full disk, an unwritable folder, an unsavable state: the run goes on
            why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            self.error = f"checkpoint {self._number} could not be written to {self.path} ({why}); no more were tried"
        else:
            self.written += 1
            self.bytes = data.nbytes
        self.seconds += time.perf_counter() - start
        self._last_s = self.clock.elapsed(sync=False)


# ---------------------------------------------------------------- resuming

def resume_problem(run: Mapping[str, Any]) -> str | None:
    """Why the stored ``run`` (a ``RunStore`` row) cannot be resumed, or None when it can."""
    rid, outcome = run["id"], run["outcome"]
    if outcome == "running":
        return (f"run {rid} is still running (process {run.get('pid')} on {run.get('host')}); "
                "it can be resumed once it is interrupted, or found lost after its process ended")
    if outcome not in RESUMABLE:
        return (f"run {rid} already ended ({outcome}: {run.get('detail') or ''}); only an interrupted, lost or "
                "failed run can be resumed")
    if not run.get("resumable"):
        every = (run.get("recipe") or {}).get("train", {}).get("checkpoint_every_s")
        why = "checkpoints were off (train.checkpoint_every_s = 0)" if every == 0 else (
            "none was written before it ended" + (f" (one every {every:g} s of its clock: "
                                                  "train.checkpoint_every_s)" if every else ""))
        return f"run {rid} ({outcome}) has no checkpoint to resume from: {why}"
    return None


@dataclass
class Resume:
    """A stored run and the checkpoint it continues from, read and checked before its clock starts."""

    store: RunStore
    run: dict[str, Any]
    path: Path
    payload: dict[str, Any]
    read_s: float  # reading the checkpoint: a cost of resuming, added to the clock

    @property
    def run_id(self) -> str:
        return self.run["id"]

    @property
    def recipe(self) -> Recipe:
        return from_dict(self.run["recipe"])

    @property
    def elapsed_s(self) -> float:
        """Clock time the run had when its checkpoint was taken, and the read."""
        return self.payload["clock"]["elapsed_s"] + self.read_s

    @property
    def eval_s(self) -> float:
        return self.payload["clock"]["eval_s"]

    @property
    def device(self) -> str:
        """The device type it trained on (cpu, cuda): it resumes there, where its generators' states apply."""
        return self.payload["settings"]["device"]


def open_resume(store: RunStore, run_id: str) -> Resume:
    """The run ``run_id`` (a unique prefix will do) of ``store`` with its checkpoint read, or ConfigError
    saying in one line why it cannot be resumed."""
    run = store.get_run(run_id)
    problem = resume_problem(run)
    if problem:
        raise ConfigError(problem)
    path = store.checkpoint_path(run["id"])
    start = time.perf_counter()
    payload = read(path)
    if payload.get("run_id") != run["id"]:
        raise ConfigError(f"checkpoint {path} belongs to run {payload.get('run_id')}, not {run['id']}")
    return Resume(store, run, path, payload, time.perf_counter() - start)
