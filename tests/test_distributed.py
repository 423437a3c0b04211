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

from speedrun.store import RunStore
from speedrun.train.run import train
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
# No augmentation (each rank draws its own) and no BatchNorm (each rank normalizes its share): what is
# left of a step is the gradient of the global batch, which DDP's all-reduce gives every rank.
EXACT = {**TINY, "data.flip": "false", "data.translate_px": "0", "train.epochs": "1", "eval.batch_size": "100",
         "train.channels_last": "false"}
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
