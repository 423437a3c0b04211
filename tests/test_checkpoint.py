"""Checkpoints and exact resume (speedrun.train.checkpoint): an interrupted, lost or failed run continued
from its checkpoint ends with the weights of the same run uninterrupted, bit for bit, on CPU."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, synthetic_images, write_idx_dataset
from speedrun.cli import main
from speedrun.config import ConfigError
from speedrun.data.loader import ResidentLoader
from speedrun.data.stream import StreamLoader
from speedrun.measure.clock import Clock
from speedrun.store import RunStore, StoreError
from speedrun.train import checkpoint
from speedrun.train.run import resume_or_train, train

SMALL = {**TINY, "train.batch_size": "64"}  # 8 steps an epoch on 512 images, 16 in all
EVERY_STEP = {"train.checkpoint_every_s": 1e-9}  # a checkpoint after every step
# The base recipe (fashion-mnist) brings the whitened stem frozen after 25% (FreezeStem), Muon, flips,
# one-cycle, label smoothing and flip-TTA; these add the other techniques that hold state.
MIXED = {**SMALL, "average.kind": "ema", "data.mixup_alpha": 0.4, "data.cutmix_alpha": 1.0,
         "data.resize_start_scale": 0.5, "data.resize_scale_batch": True, "data.translate_px": 2, "data.cutout_px": 4}
LOOKAHEAD = {**SMALL, "average.kind": "lookahead", "average.every": 2, "data.alternating_flip": True,
             "data.resize_start_scale": 0.5, "data.mixup_alpha": 0.2, "schedule.momentum_low": 0.8,
             "model.stem_train_frac": 0.5}
NEVER = 0.999  # a target no tiny run reaches: every run trains its whole schedule


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("checkpoint")
    return root / "home", write_idx_dataset(root / "small", *synthetic_images(512, seed=0),
                                            *synthetic_images(128, seed=1))


@pytest.fixture(autouse=True)
def shared_home(shared, monkeypatch) -> None:
    """One SPEEDRUN_HOME for the module: the dataset is prepared and the matmul peak measured once (each
    test still has its own run store)."""
    monkeypatch.setenv("SPEEDRUN_HOME", str(shared[0]))


@pytest.fixture
def small_dir(shared) -> Path:
    return shared[1]


class InterruptAt:
    """Ctrl-C before step ``step`` (once). ``keep_at``: before that step, copy the run's checkpoint (it
    holds that step) to ``kept``, so a test can resume from an earlier checkpoint and redo the work after it."""

    def __init__(self, step: int, *, keep_at: int | None = None, folder: Path | None = None) -> None:
        self.step, self.keep_at, self.folder, self.fired = step, keep_at, folder, False
        self.kept: Path | None = None

    def before_batch(self, state) -> None:
        if state.step == self.keep_at:
            (current,) = self.folder.glob("*.pt")
            self.kept = shutil.copy(current, current.with_suffix(".kept"))
        if state.step == self.step and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    a, b = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def run(data: Path, overrides: dict, store: Path, **kw):
    return train("fashion-mnist", data=data, overrides=overrides, target=NEVER, store=store, **kw)


def points(curve) -> list[tuple]:
    return [(p.step, p.accuracy, p.test_loss, p.train_loss) for p in curve]


# ---------------------------------------------------------------- exact resume, in-process

def test_resume_from_an_earlier_checkpoint_is_bit_identical_with_ema_mixing_resizing_and_freezing(
        small_dir, tmp_path):
    store = tmp_path / "runs.sqlite"
    reference = run(small_dir, MIXED, store)  # no checkpoints: writing them must not change training either
    assert reference.checkpoints_written == 0 and len(reference.curve) == 2
    first_eval = reference.curve[0].step  # batch scaling: fewer, larger steps early

    stop = InterruptAt(first_eval + 2, keep_at=first_eval - 1, folder=RunStore(store).checkpoint_dir)
    r = run(small_dir, {**MIXED, **EVERY_STEP}, store, hooks=[stop])
    assert r.outcome == "interrupted" and len(r.curve) == 1  # the first evaluation came before the interrupt
    assert r.checkpoints_written == first_eval + 2 and r.checkpoint_bytes > 0 and r.checkpoint_s > 0
    assert RunStore(store).get_run(r.run_id)["resumable"]
    path = RunStore(store).checkpoint_path(r.run_id)
    os.replace(stop.kept, path)  # as if killed before the later checkpoints were written
    before = checkpoint.read(path)
    assert before["fit"]["counters"]["step"] == first_eval - 1 and before["curve"] == []

    resumed = train(resume=r.run_id, store=store)
    assert resumed.run_id == r.run_id and resumed.outcome == "budget_exhausted" and resumed.resumes == 1
    assert_same_weights(reference.model, resumed.model)
    assert points(resumed.curve) == points(reference.curve)  # the evaluation after the checkpoint, redone
    assert resumed.steps == reference.steps and resumed.images_seen == reference.images_seen
    assert resumed.epochs == reference.epochs and resumed.flops_per_image == reference.flops_per_image
    # The clock carries the time before the checkpoint, and the curve's times run on from it.
    assert resumed.total_time_s > before["clock"]["elapsed_s"]
    assert resumed.curve[0].elapsed_s > before["clock"]["elapsed_s"]
    assert resumed.checkpoints_written == reference.steps - 1  # all but after the last step, over both processes

    stored = RunStore(store).get_run(r.run_id)
    assert stored["outcome"] == "budget_exhausted" and stored["resumes"] == 1 and not stored["resumable"]
    assert [p["step"] for p in stored["curve"]] == [p.step for p in reference.curve]
    assert stored["summary"]["resumes"] == 1 and stored["env"]["resumed"][0]["step"] == first_eval - 1
    assert not path.exists() and not list(path.parent.glob("*.tmp*"))  # ended by itself: deleted


def test_resume_at_an_epoch_boundary_is_bit_identical_with_lookahead_and_alternating_flips(small_dir, tmp_path):
    store = tmp_path / "runs.sqlite"
    reference = run(small_dir, LOOKAHEAD, store)
    r = run(small_dir, {**LOOKAHEAD, **EVERY_STEP}, store, hooks=[InterruptAt(8)])  # 8 steps: one epoch
    assert r.outcome == "interrupted"
    assert checkpoint.read(RunStore(store).checkpoint_path(r.run_id))["fit"]["loader"]["position"] == 512
    resumed = train(resume=r.run_id[:6], store=store)  # a unique prefix of the id will do
    assert resumed.run_id == r.run_id
    assert_same_weights(reference.model, resumed.model)
    assert points(resumed.curve) == points(reference.curve)


@pytest.mark.parametrize("kind", ["resident", "stream"])
def test_a_loader_resumed_mid_epoch_yields_the_batches_and_augmentations_of_the_uninterrupted_one(kind):
    images, labels = synthetic_images(100, size=12, seed=3)
    images = images[:, None]

    def loader():
        options = dict(batch_size=16, mean=(0.5,), std=(0.25,), train=True, seed=7, flip=True, translate_px=2,
                       cutout_px=3, rrc_scale=(0.5, 1.0))
        if kind == "stream":
            return StreamLoader(images, labels.astype("int64"), **options)
        return ResidentLoader(torch.as_tensor(images), torch.as_tensor(labels), **options)

    whole = loader()
    expected = list(whole.epoch(2))
    cut = loader()
    batches = cut.epoch(2)
    got = [next(batches) for _ in range(3)]
    saved = cut.state_dict()
    assert saved["position"] == 48 and saved["epoch"] == 2
    again = loader()
    again.load_state_dict(saved)
    got += list(again.epoch(2))
    assert len(got) == len(expected) == 6
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(RuntimeError, match="epoch 2"):
        again.load_state_dict(saved)
        next(again.epoch(3))


def test_clock_carry_counts_earlier_time():
    clock = Clock().start()
    clock.carry(100.0, 7.0)
    assert 100.0 <= clock.elapsed() < 110.0 and clock.eval_s == 7.0


# ---------------------------------------------------------------- when checkpoints are written, kept, refused

def test_default_writes_no_checkpoint_in_a_short_run_and_refuses_to_resume_it(small_dir, tmp_path):
    store = tmp_path / "runs.sqlite"
    r = run(small_dir, SMALL, store, hooks=[InterruptAt(3)])
    assert r.outcome == "interrupted" and r.checkpoints_written == 0  # 300 s by default: none in a short run
    with pytest.raises(ConfigError, match=r"has no checkpoint to resume from: none was written before it ended"):
        train(resume=r.run_id, store=store)
    done = run(small_dir, {**SMALL, **EVERY_STEP}, store, budget="1ep")
    assert done.outcome == "budget_exhausted" and done.checkpoints_written == 7
    assert not RunStore(store).checkpoint_path(done.run_id).exists()  # ended by itself: deleted
    with pytest.raises(ConfigError, match=r"already ended \(budget_exhausted: epoch budget"):
        train(resume=done.run_id, store=store)
    with pytest.raises(StoreError, match="no run with id 'nope'"):
        train(resume="nope", store=store)
    with pytest.raises(ConfigError, match="takes no recipe overrides"):
        train(resume=r.run_id, store=store, train__epochs=3)
    with pytest.raises(ConfigError, match="needs the run store"):
        train(resume=r.run_id, store=None)


def test_keep_checkpoint_keeps_it_and_a_failed_write_does_not_stop_the_run(small_dir, tmp_path):
    store = tmp_path / "runs.sqlite"
    kept = run(small_dir, {**SMALL, **EVERY_STEP, "train.keep_checkpoint": True}, store, budget="1ep")
    path = RunStore(store).checkpoint_path(kept.run_id)
    assert kept.outcome == "budget_exhausted" and checkpoint.read(path)["fit"]["counters"]["step"] == 7

    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").write_text("a file where the folder should be")
    r = run(small_dir, {**SMALL, **EVERY_STEP}, other / "runs.sqlite", budget="1ep")
    assert r.outcome == "budget_exhausted" and r.steps == 8 and r.checkpoints_written == 0
    assert "checkpoint 1 could not be written" in r.checkpoint_error


def test_a_damaged_checkpoint_is_refused_in_one_line(small_dir, tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    r = run(small_dir, {**SMALL, **EVERY_STEP}, store, hooks=[InterruptAt(3)])
    path = RunStore(store).checkpoint_path(r.run_id)
    path.write_bytes(path.read_bytes()[:100])
    assert main(["train", "--resume", r.run_id, "--store", str(store)]) == 2
    message = capsys.readouterr().err
    assert f"checkpoint {path} cannot be read" in message and "Traceback" not in message
    assert main(["train", "--resume", r.run_id, "--set", "train.epochs=3", "--store", str(store)]) == 2
    assert "drop --set" in capsys.readouterr().err


def test_runs_lists_resumable_runs_and_the_cli_resumes_one(small_dir, tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    r = run(small_dir, {**SMALL, **EVERY_STEP}, store, hooks=[InterruptAt(5)])
    assert main(["runs", "--store", str(store), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["resumable"] and listed["resumes"] == 0 and listed["outcome"] == "interrupted"
    assert main(["runs", "--store", str(store)]) == 0
    text = capsys.readouterr().out
    assert "interrupted, resumable" in text and "speedrun train --resume ID" in text

    assert main(["train", "--resume", r.run_id, "--store", str(store), "--json"]) == 1  # target not reached
    result = json.loads(capsys.readouterr().out)
    assert result["run_id"] == r.run_id and result["resumes"] == 1 and result["steps"] == 16
    assert result["checkpoints_written"] == 15
    assert main(["runs", "--store", str(store)]) == 0
    assert "budget_exhausted (1x resumed)" in capsys.readouterr().out


def test_resume_or_train_resumes_what_it_can_and_trains_the_rest(small_dir, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    cut = run(small_dir, {**SMALL, **EVERY_STEP}, store, hooks=[InterruptAt(4)], budget="1ep")
    again = resume_or_train(store, cut.run_id, "fashion-mnist", data=small_dir, overrides=SMALL, target=NEVER,
                            budget="1ep")
    assert again.run_id == cut.run_id and again.resumes == 1 and again.steps == 8
    fresh = resume_or_train(store, again.run_id, "fashion-mnist", data=small_dir, overrides=SMALL, target=NEVER,
                            budget="1ep")  # it finished: a new run
    assert fresh.run_id != again.run_id and fresh.resumes == 0


def test_ablate_resumes_a_run_cut_short_instead_of_restarting_it(small_dir, tmp_path, monkeypatch):
    from speedrun import ablate as ablate_mod
    from speedrun.ablate import AblationInterrupted, ablate

    real, calls = ablate_mod._train, []

    def interrupt_second_run(*args, **kwargs):
        calls.append(kwargs.get("resume_run"))
        if len(calls) == 2:
            kwargs["hooks"] = [InterruptAt(5)]
        return real(*args, **kwargs)

    monkeypatch.setattr(ablate_mod, "_train", interrupt_second_run)
    options = dict(seeds=1, techniques=["label-smoothing"], data=small_dir, target=NEVER, budget="1ep",
                   overrides={**SMALL, **EVERY_STEP}, device="cpu", store=tmp_path / "runs.sqlite",
                   latency_samples=0, resamples=50)
    with pytest.raises(AblationInterrupted):
        ablate("fashion-mnist", **options)
    store = RunStore(tmp_path / "runs.sqlite")
    (ablation,) = store.list_ablations()
    cut = store.ablation_runs(ablation["id"])[-1]
    assert cut["outcome"] == "interrupted" and cut["resumable"]
    result = ablate("fashion-mnist", **options)  # the same command continues it
    assert result.complete and calls[2] == cut["id"]
    runs = store.ablation_runs(ablation["id"])
    assert len(runs) == 2 and runs[-1]["id"] == cut["id"] and runs[-1]["resumes"] == 1
    assert runs[-1]["outcome"] == "budget_exhausted"


# ---------------------------------------------------------------- kill -9 at any moment

def _cli(*args: str, pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(checkpoint.PAUSE_ENV, None)
    if pause:
        env[checkpoint.PAUSE_ENV] = pause
    return subprocess.Popen([sys.executable, "-m", "speedrun", "train", "--device", "cpu", "--threads", "1", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when_paused(proc: subprocess.Popen, pause: str) -> None:
    """SIGKILL the process once its checkpoint write says it paused at ``pause`` (PHASE:N)."""
    phase, number = pause.split(":")
    for line in proc.stderr:
        if f"checkpoint {number} paused {phase}" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()


def test_sigkill_before_during_and_after_a_checkpoint_write_then_resume_gives_the_same_weights(small_dir, tmp_path):
    """Killed three times (before its 3rd write, halfway through the 2nd write of the first resume, just
    after the 1st write of the second), then resumed to the end: the weights of the run uninterrupted.
    After every kill the store reads back whole and the checkpoint holds a complete, earlier state."""
    threads = torch.get_num_threads()
    try:  # the processes below train on one thread: so does the reference, here
        reference = run(small_dir, SMALL, tmp_path / "reference.sqlite", threads=1)
    finally:
        torch.set_num_threads(threads)
    sets = [a for k, v in {**SMALL, **EVERY_STEP}.items() for a in ("--set", f"{k}={v}")]
    store = tmp_path / "runs.sqlite"
    proc = _cli("--recipe", "fashion-mnist", "--data", str(small_dir), *sets, "--target", str(NEVER), "--store",
                str(store), pause="before:3")
    _kill_when_paused(proc, "before:3")
    (row,) = RunStore(store).list_runs()
    run_id, path = row["id"], RunStore(store).checkpoint_path(row["id"])
    steps = [2]
    for pause, advance in (("during:2", 1), ("after:1", 1)):
        db = sqlite3.connect(store)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        stored = RunStore(store).get_run(run_id)
        assert stored["outcome"] == "lost" and stored["resumable"]
        assert checkpoint.read(path)["fit"]["counters"]["step"] == steps[-1]
        proc = _cli("--resume", run_id, "--store", str(store), pause=pause)
        _kill_when_paused(proc, pause)
        steps.append(steps[-1] + advance)
    assert list(path.parent.glob(f"{path.name}.tmp*")), "the write killed halfway left its temporary file"
    assert checkpoint.read(path)["fit"]["counters"]["step"] == steps[-1]  # the write that completed

    final = _cli("--resume", run_id, "--store", str(store), "--save", str(tmp_path / "resumed.pt"), "--json")
    out, err = final.communicate(timeout=300)
    assert final.returncode == 1, err  # budget exhausted: the target is out of reach
    result = json.loads(out)
    assert result["run_id"] == run_id and result["resumes"] == 3 and result["steps"] == 16
    assert_same_weights(reference.model, torch.load(tmp_path / "resumed.pt", weights_only=True)["state_dict"])
    assert not path.exists() and not list(path.parent.glob("*"))  # the run ended: checkpoint and leftovers gone
    stored = RunStore(store).get_run(run_id)
    assert stored["outcome"] == "budget_exhausted" and stored["resumes"] == 3
    assert [p["step"] for p in stored["curve"]] == [8, 16]


def test_checkpoint_settings_are_not_part_of_a_recipes_identity():
    from speedrun.compare import recipe_key
    from speedrun.recipes import get_recipe

    recipe = get_recipe("fashion-mnist").to_dict()
    before = {**recipe, "train": {k: v for k, v in recipe["train"].items()
                                  if k not in ("checkpoint_every_s", "keep_checkpoint")}}  # a run stored earlier
    kept = {**recipe, "train": {**recipe["train"], "checkpoint_every_s": 60.0, "keep_checkpoint": True}}
    longer = {**recipe, "train": {**recipe["train"], "epochs": 3.0}}
    keys = [recipe_key({"recipe_name": "r", "recipe": r}) for r in (recipe, before, kept, longer)]
    assert keys[0] == keys[1] == keys[2] != keys[3]


def test_a_hook_state_torch_cannot_save_stops_the_checkpoints_not_the_run(tmp_path):
    from speedrun.train.loop import FitState, fit

    class Unsavable:
        def state_dict(self) -> dict:
            return {"fn": lambda: 0}  # pickles by reference: a local function cannot

        def load_state_dict(self, saved, state) -> None:
            pass

    images, labels = synthetic_images(64, size=8, seed=0)
    loader = ResidentLoader(torch.as_tensor(images[:, None]), torch.as_tensor(labels).long(), batch_size=16,
                            mean=(0.5,), std=(0.25,), train=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    state = FitState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     loss_fn=torch.nn.functional.cross_entropy, loader=loader, schedule_steps=8, max_steps=8)
    writer = checkpoint.Checkpointer(tmp_path / "r.pt", every_s=1e-9, clock=Clock().start(), settings={})
    hooks = [writer, Unsavable()]
    writer.bind(hooks, list)
    fit(state, hooks)
    assert state.outcome == "completed" and state.step == 8
    assert writer.written == 0 and "could not be written" in writer.error and "lambda" in writer.error
    assert not (tmp_path / "r.pt").exists() and not list(tmp_path.iterdir())
