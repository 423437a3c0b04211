"""Inputs a hostile new user tries (issue 18): each ends in a one-line error or a correct recorded
outcome, never a traceback or a wrong result."""
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

from speedrun.cli import main
from speedrun.data import download, imagefolder
from speedrun.data.cli import main as data_main
from speedrun.data.sources import FASHION_MNIST_CLASSES, DataError, IdxSource, prepare, read_meta, resolve
from speedrun.store import RunStore, StoreError
from speedrun.train.hooks import TimeBudget
from speedrun.train.loop import StopFit
from tests.conftest import TINY, make_tar, synthetic_images, write_idx_dataset, write_tree

SETS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
REPO = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    """The command's stderr, which must be a single `speedrun: error:` line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("speedrun: error: "), err
    return err


def namespace_works() -> bool:
    """Whether this machine lets us mount in a user namespace (a read-only bind, a tiny tmpfs) unprivileged."""
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {folder}"],
                              capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not namespace_works(), reason="no user namespaces to mount a test file system in")


def python_in_namespace(mounts: str, code: str, home: Path) -> subprocess.CompletedProcess:
    """Run Python ``code`` after the shell commands ``mounts``, in a private mount namespace."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f'{mounts} && exec "$0" -c "$1"', sys.executable, code],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "SPEEDRUN_HOME": str(home)})


# ---------------------------------------------------------------- recipes that are not TOML text

def test_a_recipe_that_is_not_utf8_or_is_a_folder_is_one_line(tmp_path, capsys):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[train]\nepochs = 3 # caf\xe9\n')
    assert main(["train", "--recipe", str(latin)]) == 2
    assert f"{latin}: not UTF-8 text (byte 0xe9 at offset 24); save the recipe as UTF-8" in one_error_line(capsys)
    (tmp_path / "x.toml").mkdir()
    assert main(["train", "--recipe", str(tmp_path / "x.toml")]) == 2
    assert "is a folder, not a TOML file" in one_error_line(capsys)


# ---------------------------------------------------------------- damaged run stores

def damaged_store(path: Path) -> Path:
    """A store whose header and schema page are intact and whose other pages are garbage."""
    store = RunStore(path)
    for i in range(30):
        store.start_run(run_id=f"run{i:02d}", recipe_name="r", recipe={"pad": "x" * 500}, env={}, target=0.9,
                        seed=i)
    store.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(np.random.default_rng(0).integers(0, 256, size - 4096, dtype=np.uint8).tobytes())
    return path


def test_runs_and_show_on_a_damaged_store_are_one_line(tmp_path, capsys):
    path = damaged_store(tmp_path / "runs.sqlite")
    for argv in (["runs"], ["show", "run01"], ["compare"], ["report", "--out", str(tmp_path / "r")]):
        assert main([*argv, "--store", str(path)]) == 2, argv
        err = one_error_line(capsys)
        assert "database disk image is malformed" in err and "the file is damaged: move it aside" in err


def test_train_on_a_damaged_store_trains_every_seed_and_says_none_was_recorded(tmp_path, capsys, synthetic_dir):
    path = damaged_store(tmp_path / "runs.sqlite")
    code = main(["train", "--data", str(synthetic_dir), "--target", "0.6", *SETS, "--seeds", "2", "--store",
                 str(path), "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert code == 0 and [r["seed"] for r in result["runs"]] == [0, 1] and result["pass_rate"] == 1.0
    assert "training anyway, the run will not be recorded" in captured.err
    assert "2 of 2 run(s) not recorded in the run store" in captured.err and "Traceback" not in captured.err


# ---------------------------------------------------------------- reading commands never create or write a store

def test_reading_commands_do_not_create_a_mistyped_store(tmp_path, capsys):
    typo = tmp_path / "rnus.sqlite"
    for argv in (["runs"], ["show", "abc"], ["compare"], ["report", "--out", str(tmp_path / "r")]):
        assert main([*argv, "--store", str(typo)]) == 2, argv
        assert f"no run store at {typo}: it does not exist" in one_error_line(capsys)
    assert not typo.exists()
    assert main(["runs", "--store", str(tmp_path)]) == 2 and "it is not a file" in one_error_line(capsys)


def stored_run(path: Path) -> Path:
    store = RunStore(path)
    store.start_run(run_id="abc123", recipe_name="r", recipe={}, env={"device_name": "cpu"}, target=0.9, seed=0)
    store.finish_run("abc123", outcome="reached", detail="ok", summary={"time_to_accuracy_s": 1.0}, curve=[])
    store.close()
    return path


@needs_namespace
def test_runs_lists_a_store_on_a_read_only_file_system(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    before = stored_run(folder / "runs.sqlite").read_bytes()
    proc = python_in_namespace(f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}",
                               f"from speedrun.cli import main; main(['runs', '--json', '--store', "
                               f"'{folder / 'runs.sqlite'}'])", tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)] == ["abc123"]
    assert (folder / "runs.sqlite").read_bytes() == before and os.listdir(folder) == ["runs.sqlite"]


def test_a_store_that_cannot_be_written_is_read_without_writing(tmp_path, monkeypatch):
    """The read-only path as it runs where the file system refuses writes (simulated: root may write anywhere)."""
    from speedrun import store as store_module

    path = stored_run(tmp_path / "runs.sqlite")
    before = path.read_bytes()
    monkeypatch.setattr(store_module, "_writable", lambda p: False)
    reader = RunStore(path, existing=True)
    assert [r["id"] for r in reader.list_runs()] == ["abc123"] and reader.get_run("abc")["outcome"] == "reached"
    with pytest.raises(StoreError, match="cannot write to the run store"):
        reader.start_run(run_id="new", recipe_name="r", recipe={}, env={}, target=0.9, seed=0)
    reader.close()
    assert path.read_bytes() == before


# ---------------------------------------------------------------- a store that fills up during a run

def test_a_run_whose_result_cannot_be_stored_is_not_listed_as_killed(tmp_path, capsys, synthetic_dir, monkeypatch):
    real_write_many = RunStore._write_many

    def full_for_the_curve(self, statements):
        if any("curve_json" in sql for sql, _ in statements):  # the final write, with the whole curve
            raise StoreError(f"cannot write to the run store at {self.path}: database or disk is full")
        return real_write_many(self, statements)

    monkeypatch.setattr(RunStore, "_write_many", full_for_the_curve)
    path = tmp_path / "runs.sqlite"
    code = main(["train", "--data", str(synthetic_dir), "--target", "0.6", *SETS, "--store", str(path)])
    assert code == 0 and "database or disk is full" in capsys.readouterr().err
    [run] = RunStore(path).list_runs()
    assert run["outcome"] == "failed" and run["detail"].startswith("ended reached (")
    assert "but its result could not be recorded: cannot write to the run store" in run["detail"]


def test_a_run_left_running_reads_as_lost_without_a_guessed_cause(tmp_path):
    from tests.test_store import _dead_pid

    store = RunStore(tmp_path / "runs.sqlite")
    store.start_run(run_id="r1", recipe_name="r", recipe={}, env={}, target=0.9, seed=0)
    with store._db:
        store._db.execute("UPDATE runs SET pid = ? WHERE id = 'r1'", (_dead_pid(),))
    detail = store.get_run("r1")["detail"]
    assert "ended without recording an outcome (killed outright, or the store could not be written)" in detail
    assert "SIGKILL" not in detail and "out of memory" not in detail


# ---------------------------------------------------------------- store problems keep the run's exit code

def test_a_store_problem_keeps_the_exit_code_of_an_interrupted_run(capsys, unlearnable_dir, tmp_path, monkeypatch):
    from speedrun.train import hooks

    def interrupt(self, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(hooks.Evaluator, "run", interrupt)
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["train", "--data", str(unlearnable_dir), "--target", "0.9", *SETS, "--store",
                 str(blocker / "runs.sqlite")])
    captured = capsys.readouterr()
    assert code == 130 and "interrupted" in captured.out
    assert "1 of 1 run(s) not recorded in the run store: cannot open the run store" in captured.err
