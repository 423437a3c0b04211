"""Data-parallel training (speedrun.train.distributed): 2 gloo processes on the CPU against 1 process on
the same global batch, sharded evaluation, a rank that dies, one stored run per job."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from speedrun.config import ConfigError
from speedrun.store import RunStore
from speedrun.train.run import train
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
# No augmentation (each rank draws its own) and no BatchNorm (each rank normalizes its share): what is
# left of a step is the gradient of the global batch, which DDP's all-reduce gives every rank. fp32: the
# tolerances below are fp32 rounding's (precision=auto is bf16 on a CPU with native bf16).
EXACT = {**TINY, "data.flip": "false", "data.translate_px": "0", "train.epochs": "1", "eval.batch_size": "100",
         "train.channels_last": "false", "train.precision": "fp32"}
WITHOUT = ["patch-whitening", "stem-freezing"]
NEVER = 0.999


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], *, timeout_s: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), *args]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SPEEDRUN_DIST_TIMEOUT_S": "20",
                   **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout_s)


def _job(tmp_path: Path, options: dict) -> tuple[dict, dict]:
    """Train ``options`` in a 2-process job; rank 0's weights and result."""
    out = tmp_path / "job"
    out.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "train": options}))
    done = _torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(spec)])
    assert done.returncode == 0, done.stderr[-3000:]
    weights = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    for name in weights[0]:  # every rank took the same steps
        assert torch.equal(weights[0][name], weights[1][name]), name
    return weights[0], json.loads((out / "rank0.json").read_text())


# After 8 steps, as far apart as fp32 rounding puts them (the job sums each half's gradient, then the
# halves): SGD within 1e-5 of weights ~0.5; Muon's Newton-Schulz iteration lifts small singular values
# ~3.4x per iteration, rounding with them, to ~7e-4 (its steps are 0.1 each: a missing all-reduce or a
# rank on its own half-batch is 10-100x further off, and the ranks would differ, which is checked exactly).
TOLERANCE = {"sgd": 1e-5, "muon": 3e-3}


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_two_processes_train_the_weights_one_process_does_on_the_same_global_batch(synthetic_dir, tmp_path,
                                                                                     optimizer):
    options = dict(recipe="fashion-mnist", data=str(synthetic_dir), model="tests.own_models:plain_net",
                   overrides={**EXACT, "optim.name": optimizer}, without=WITHOUT, target=NEVER, seed=3, threads=1,
                   store=str(tmp_path / "runs.db"))
    job_weights, job = _job(tmp_path, options)
    alone = train(**{**options, "store": None})
    for name, tensor in alone.model.state_dict().items():  # fp32 sums in another order: rounding apart
        torch.testing.assert_close(job_weights[name], tensor, rtol=0, atol=TOLERANCE[optimizer], msg=name)
    assert job["steps"] == alone.steps == 8 and job["images_seen"] == alone.images_seen == 1024
    assert job["curve"][-1]["accuracy"] == pytest.approx(alone.curve[-1].accuracy, abs=1 / 256)
    runs = RunStore(tmp_path / "runs.db").list_runs()
    assert len(runs) == 1  # one run per job, rank 0's
    dist_env = runs[0]["env"]["distributed"]
    assert dist_env["world_size"] == 2 and dist_env["backend"] == "gloo"
    assert [r["rank"] for r in dist_env["ranks"]] == [0, 1] and all(r["pid"] and r["host"] for r in dist_env["ranks"])


def test_a_time_budget_on_rank_0s_clock_stops_every_rank_at_the_same_step(unlearnable_dir, tmp_path):
    options = dict(recipe="fashion-mnist", data=str(unlearnable_dir), model="tests.own_models:plain_net",
                   overrides={**EXACT, "train.epochs": "200"}, without=WITHOUT, target=NEVER, budget="4s",
                   threads=1, store=str(tmp_path / "runs.db"))
    _, job = _job(tmp_path, options)  # the ranks' weights are equal: the same steps (checked there)
    assert job["outcome"] == "budget_exhausted" and "time budget of 4 s" in job["detail"]
    assert 0 < job["steps"] < 200 * 8


def test_sharded_evaluation_counts_an_uneven_last_shard_once_and_evaluates_rank_0s_model(tmp_path):
    import torch.multiprocessing as mp

    from speedrun.data.loader import ResidentLoader
    from speedrun.train.hooks import evaluate
    from tests.ddp_worker import eval_fixture, evaluate_rank

    model, images, labels = eval_fixture()
    whole = evaluate(model, ResidentLoader(images, labels, batch_size=100, mean=(0.5,), std=(0.25,), train=False))
    mp.spawn(evaluate_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"eval{r}.pt") for r in (0, 1)]
    assert [r["served"] for r in ranks] == [150, 100]  # batches 0 and 2 on rank 0, batch 1 on rank 1
    for r in ranks:  # 250 images counted once each, with rank 0's BatchNorm statistics
        assert r["accuracy"] == pytest.approx(whole[0], abs=1e-12) and r["loss"] == pytest.approx(whole[1], rel=1e-6)


def test_speedrun_train_nproc_runs_one_job_that_rank_0_records_and_prints(synthetic_dir, tmp_path):
    store = tmp_path / "runs.db"
    sets = [a for k, v in {**TINY, "train.epochs": "1"}.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPEEDRUN_DIST_TIMEOUT_S": "20"}
    done = subprocess.run([sys.executable, "-m", "speedrun", "train", "--nproc", "2", "--data", str(synthetic_dir),
                           "--target", "0.999", "--store", str(store), "--json", *sets],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])  # one JSON line: rank 0's
    assert len(done.stdout.strip().splitlines()) == 1, done.stdout
    assert result["outcome"] == "budget_exhausted" and result["images_seen"] == 1024
    assert result["env"]["distributed"]["world_size"] == 2 and result["env"]["threads"] == max(1, os.cpu_count() // 2)
    (run,) = RunStore(store).list_runs()
    assert run["id"] == result["run_id"] and run["outcome"] == "budget_exhausted"


def test_train_batch_not_divisible_by_the_processes_is_refused_in_one_line(synthetic_dir, tmp_path):
    done = _torchrun(["-m", "speedrun", "train", "--data", str(synthetic_dir), "--set", "train.batch_size=127",
                      "--store", str(tmp_path / "runs.db")])
    assert done.returncode != 0
    assert "speedrun: error: train.batch_size 127 is the global batch, shared among 2 processes" in done.stderr
    assert "speedrun/train" not in done.stderr  # no traceback from the ranks (torchrun then reports their exit)


def test_a_rank_killed_mid_run_ends_the_job_with_a_recorded_outcome_within_the_timeout(synthetic_dir, tmp_path):
    store = tmp_path / "runs.db"
    sets = [a for k, v in {**TINY, "train.epochs": "3"}.items() for a in ("--set", f"{k}={v}")]
    start = time.monotonic()
    done = _torchrun(["-m", "speedrun", "train", "--data", str(synthetic_dir), "--model",
                      "tests.own_models:dies_on_rank_1", "--without", ",".join(WITHOUT), "--store", str(store),
                      "--threads", "1", *sets], timeout_s=100, env={"TEST_KILL_AT_FORWARD": "4"})
    assert done.returncode != 0
    assert time.monotonic() - start < 90  # the 20 s collective timeout, plus start-up; never a hang
    (run,) = RunStore(store).list_runs()
    assert run["outcome"] == "failed", run
    assert "rank 0 of a 2-process job" in run["detail"], run["detail"]


def test_a_job_cut_short_by_a_lost_rank_resumes_on_every_rank_to_the_weights_of_an_uninterrupted_one(
        unlearnable_dir, tmp_path):
    store, saved = tmp_path / "runs.db", tmp_path / "resumed.pt"
    options = {**EXACT, "train.checkpoint_every_s": "0.0001"}  # a checkpoint after every step
    sets = [a for k, v in options.items() for a in ("--set", f"{k}={v}")]
    common = ["--data", str(unlearnable_dir), "--model", "tests.own_models:dies_on_rank_1", "--without",
              ",".join(WITHOUT), "--target", str(NEVER), "--seed", "5", "--threads", "1", *sets]
    cut = _torchrun(["-m", "speedrun", "train", "--store", str(store), *common], env={"TEST_KILL_AT_FORWARD": "7"})
    assert cut.returncode != 0
    (run,) = RunStore(store).list_runs()
    assert run["outcome"] == "failed" and (store.parent / "checkpoints" / f"{run['id']}.pt").is_file(), cut.stderr[-4000:]
    with pytest.raises(ConfigError, match="trained in 2 process"):  # one process: its batch shares are 2
        train(resume=run["id"], store=str(store))
    done = _torchrun(["-m", "speedrun", "train", "--resume", run["id"], "--store", str(store), "--threads", "1",
                      "--save", str(saved)])
    (run,) = RunStore(store).list_runs()
    assert run["outcome"] == "budget_exhausted" and run["resumes"] == 1, done.stderr[-2000:]
    whole = _job(tmp_path, dict(recipe="fashion-mnist", data=str(unlearnable_dir), model="tests.own_models:plain_net",
                                overrides=options, without=WITHOUT, target=NEVER, seed=5, threads=1, store=None))[0]
    import speedrun

    resumed = speedrun.load(saved).net.state_dict()
    for name, tensor in whole.items():  # exact: no augmentation, whose per-rank generators rank 0's replace
        assert torch.equal(resumed[name], tensor), name


def test_agreement_holds_a_hooks_stop_for_the_next_batch_and_takes_ctrl_c_and_the_loop_end_as_stops():
    import signal
    from types import SimpleNamespace

    import torch.distributed as dist

    from speedrun.train.distributed import Agreement, World
    from speedrun.train.loop import StopFit

    class Diverges:
        def after_loss(self, state):
            raise StopFit("diverged", "loss became nan")

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        agreement = Agreement(World(0, 1, 0, "gloo", torch.device("cpu"), 30.0))
        hook, state = agreement.defer(Diverges()), SimpleNamespace(step=3, outcome="running", detail="")
        # Python's own handler, or SIG_IGN where a shell started the tests in the background
        before = signal.getsignal(signal.SIGINT)
        agreement.before_fit(state)
        hook.after_loss(state)  # held, not raised: the other ranks are still in this step
        with pytest.raises(StopFit, match="loss became nan") as stop:
            agreement.before_batch(state)
        assert stop.value.outcome == "diverged"
        agreement.before_batch(state)  # settled: nothing held any more
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a flag, not a KeyboardInterrupt in a collective
        with pytest.raises(StopFit, match="interrupted at step 3"):
            agreement.before_batch(state)
        hook.after_loss(state)  # held when the loop then ends by itself: the outcome is the stop's
        state.outcome = "completed"
        agreement.after_fit(state)
        assert (state.outcome, state.detail) == ("diverged", "loss became nan")
        assert signal.getsignal(signal.SIGINT) is before  # restored
    finally:
        dist.destroy_process_group()


class _LostPeer(torch.nn.Module):
    """Fails its first training forward as a collective does when another rank is gone."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, 4)

    def forward(self, x):
        if self.training:
            raise RuntimeError("Connection closed by peer")
        return self.head(x.mean((1, 2, 3))[:, None])


def test_torchruns_sigterm_while_a_lost_ranks_error_is_handled_still_records_the_run(
        synthetic_dir, tmp_path, monkeypatch):
    """torchrun's SIGTERM and a lost rank's collective error arrive together: the signal can land while
    the error is being handled (here: while its traceback is formatted). The run is recorded as failed,
    with the first error, never left unrecorded (read back as ``lost``)."""
    import signal

    from speedrun.train import distributed
    from speedrun.train import run as run_module

    def signal_arrives():
        distributed._terminated(signal.SIGTERM, None)  # what Python runs when the SIGTERM lands here

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, distributed._terminated)
    monkeypatch.setattr(run_module.traceback, "format_exc", signal_arrives)
    try:
        result = train(model=_LostPeer(), data=str(synthetic_dir), store=str(tmp_path / "runs.db"),
                       without=WITHOUT, overrides=EXACT, target=NEVER, threads=1)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second SIGTERM cannot interrupt the record
    finally:
        signal.signal(signal.SIGTERM, previous)
    (run,) = RunStore(tmp_path / "runs.db").list_runs()
    assert result.outcome == run["outcome"] == "failed"
    assert "Connection closed by peer" in run["detail"], run["detail"]
