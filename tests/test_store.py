import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedrun.store import RunStore, StoreError


def _start(store, run_id, recipe="r", group=None):
    store.start_run(run_id=run_id, recipe_name=recipe, recipe={"name": recipe}, env={"device_name": "cpu"},
                    target=0.9, seed=0, group_id=group)


def test_runs_are_recorded_at_start_and_updated_at_the_end(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    _start(store, "abc123")
    assert store.get_run("abc")["outcome"] == "running"
    store.finish_run("abc123", outcome="reached", detail="ok", summary={"time_to_accuracy_s": 3.5,
                     "best_accuracy": 0.91}, curve=[{"elapsed_s": 1.0, "accuracy": 0.91}])
    run = RunStore(tmp_path / "runs.sqlite").get_run("abc123")  # persisted
    assert run["outcome"] == "reached" and run["time_to_accuracy_s"] == 3.5
    assert run["curve"] == [{"elapsed_s": 1.0, "accuracy": 0.91}] and run["recipe"] == {"name": "r"}


def test_list_filters_and_prefixes(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    _start(store, "aa1", recipe="x", group="g")
    _start(store, "aa2", recipe="y", group="g")
    _start(store, "bb1", recipe="x")
    store.finish_run("bb1", outcome="diverged", detail="nan", summary={}, curve=[])
    assert {r["id"] for r in store.list_runs(recipe="x")} == {"aa1", "bb1"}
    assert [r["id"] for r in store.list_runs(outcome="diverged")] == ["bb1"]
    assert {r["id"] for r in store.list_runs(group="g")} == {"aa1", "aa2"}
    assert len(store.list_runs(limit=1)) == 1
    with pytest.raises(StoreError, match="ambiguous"):
        store.get_run("aa")
    with pytest.raises(StoreError, match="no run with id 'zz'"):
        store.get_run("zz")


def test_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the run store"):
        RunStore(blocker / "runs.sqlite")


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _raw(path, run_id):
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT outcome, pid, host, curve_json FROM runs WHERE id = ?", (run_id,)).fetchone()
    finally:
        db.close()


def test_points_are_kept_as_measured_and_a_dead_run_reads_as_lost(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    _start(store, "run1")
    points = [{"elapsed_s": 1.0, "accuracy": 0.5}, {"elapsed_s": 2.0, "accuracy": 0.7}]
    for p in points:
        store.add_point("run1", p)
    run = RunStore(path).get_run("run1")  # another connection sees the committed points
    assert run["outcome"] == "running" and run["curve"] == points  # this process is alive
    assert run["pid"] == os.getpid() and run["host"] == socket.gethostname()

    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE runs SET pid = ? WHERE id = 'run1'", (_dead_pid(),))
    run = store.get_run("run1")
    assert run["outcome"] == "lost" and run["curve"] == points and run["best_accuracy"] == 0.7
    assert "evaluation point(s) kept" in run["detail"]
    assert [r["id"] for r in store.list_runs(outcome="lost")] == ["run1"] and not store.list_runs(outcome="running")
    assert _raw(path, "run1")[0] == "running"  # reading rewrote nothing

    with db:  # the same dead pid on another host (a shared store) cannot be checked from here
        db.execute("UPDATE runs SET host = 'elsewhere' WHERE id = 'run1'")
    assert store.get_run("run1")["outcome"] == "running" and store.mark_lost() == []
    with db:
        db.execute("UPDATE runs SET host = ? WHERE id = 'run1'", (socket.gethostname(),))
    db.close()

    assert store.mark_lost() == ["run1"]
    outcome, _, _, curve_json = _raw(path, "run1")
    assert outcome == "lost" and json.loads(curve_json) == points
    run = store.get_run("run1")
    assert run["outcome"] == "lost" and run["curve"] == points and store.mark_lost() == []


def test_finishing_moves_the_points_into_the_curve(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    _start(store, "run1")
    store.add_point("run1", {"elapsed_s": 1.0, "accuracy": 0.5})
    final = [{"elapsed_s": 1.0, "accuracy": 0.5}, {"elapsed_s": 2.0, "accuracy": 0.9}]
    store.finish_run("run1", outcome="reached", detail="ok", summary={}, curve=final)
    assert store.get_run("run1")["curve"] == final
    assert store._db.execute("SELECT COUNT(*) FROM run_points").fetchone()[0] == 0


# The runs table as the first schema had it: no pid, no host, no run_points table.
OLD_RUNS = """CREATE TABLE runs (id TEXT PRIMARY KEY, group_id TEXT, created_at TEXT NOT NULL,
    recipe_name TEXT NOT NULL, target REAL, seed INTEGER, outcome TEXT NOT NULL, detail TEXT,
    time_to_accuracy_s REAL, best_accuracy REAL, device TEXT, recipe_json TEXT NOT NULL, env_json TEXT NOT NULL,
    curve_json TEXT NOT NULL DEFAULT '[]', summary_json TEXT NOT NULL DEFAULT '{}')"""


def test_a_store_of_the_previous_schema_opens_and_migrates(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(OLD_RUNS)
    for run_id, outcome, curve in (("old1", "reached", '[{"accuracy": 0.9}]'), ("old2", "running", "[]")):
        db.execute("INSERT INTO runs (id, created_at, recipe_name, outcome, recipe_json, env_json, curve_json)"
                   " VALUES (?, '2024-01-01T00:00:00+00:00', 'r', ?, '{}', '{}', ?)", (run_id, outcome, curve))
    db.commit()
    db.close()

    store = RunStore(path)
    columns = {r[1] for r in store._db.execute("PRAGMA table_info(runs)")}
    assert {"pid", "host"} <= columns
    assert store.get_run("old1")["curve"] == [{"accuracy": 0.9}]
    assert store.get_run("old2")["outcome"] == "running"  # no pid recorded: cannot be judged lost
    _start(store, "new1")
    store.add_point("new1", {"accuracy": 0.4})
    assert store.get_run("new1")["curve"] == [{"accuracy": 0.4}]
    RunStore(path).close()  # opening a migrated store again is a no-op
    assert {r["id"] for r in RunStore(path).list_runs()} == {"old1", "old2", "new1"}


def test_points_are_written_in_wal_mode_and_each_is_committed(tmp_path):
    """What keeps a per-evaluation write cheap (no fsync of the whole database per commit) and durable
    for a run killed right after it: WAL with synchronous=NORMAL, each point committed on its own.
    Its cost (~0.05 ms median on this project's machine) is measured, not asserted: no timed tests."""
    store = RunStore(tmp_path / "runs.sqlite")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    _start(store, "run1")
    point = {"elapsed_s": 12.5, "epoch": 3.0, "step": 300, "accuracy": 0.91, "test_loss": 0.3, "train_loss": 0.2}
    store.add_point("run1", point)
    other = RunStore(tmp_path / "runs.sqlite")  # another connection sees it: committed, not pending
    assert other.get_run("run1")["curve"][0]["accuracy"] == 0.91


def test_a_sigkilled_run_is_listed_as_lost_with_its_curve(tmp_path, unlearnable_dir, capsys):
    from speedrun.cli import main
    from tests.conftest import TINY

    path = tmp_path / "runs.sqlite"
    overrides = {**TINY, "train.epochs": "1000"}  # unlearnable labels: it would run for minutes
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    proc = subprocess.Popen([sys.executable, "-m", "speedrun", "train", "--data", str(unlearnable_dir), "--target",
                             "0.99", "--threads", "1", "--store", str(path), *sets],
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs: list[dict] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                reader = RunStore(path)
                runs = reader.list_runs()
                reader.close()
            if runs and runs[0]["curve"]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()
        assert runs and runs[0]["outcome"] == "running" and runs[0]["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

    assert main(["runs", "--json", "--store", str(path)]) == 0
    [run] = json.loads(capsys.readouterr().out)
    assert run["outcome"] == "lost" and len(run["curve"]) >= 1 and run["curve"][0]["step"] > 0
    assert main(["show", run["id"], "--store", str(path)]) == 0 and "lost" in capsys.readouterr().out
    assert main(["runs", "--mark-lost", "--store", str(path)]) == 0
    assert run["id"] in capsys.readouterr().err
    assert _raw(path, run["id"])[0] == "lost"


def test_network_file_systems_keep_the_rollback_journal(tmp_path):
    from speedrun.store import _network_fs

    mounts = "/dev/vda / ext4 rw 0 0\nserver:/export /shared nfs4 rw 0 0\nserver:/x /shared/local ext4 rw 0 0\n"
    assert _network_fs(Path("/shared/runs.sqlite"), mounts)
    assert not _network_fs(Path("/shared/local/runs.sqlite"), mounts)  # the longest mount decides
    assert not _network_fs(Path("/sharedx/runs.sqlite"), mounts) and not _network_fs(Path("/home/r.sqlite"), mounts)
