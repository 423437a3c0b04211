"""The run store: one embedded SQLite database of runs (``$SPEEDRUN_HOME/runs.sqlite`` by default).

A run is inserted when it starts (outcome ``running``, with its pid and host), each evaluation point is
appended to ``run_points`` as it is measured, and the run is updated when it ends. A run that is
interrupted or fails is updated with its curve so far; one killed outright (SIGKILL, the OOM killer)
keeps its points, and reads back as ``lost`` once its process is gone from this host. An interrupted,
lost or failed run with a checkpoint (``speedrun.train.checkpoint``, kept in ``checkpoints/`` beside the
store) reads back as ``resumable``; resumed, it is ``running`` again in the same row, its ``resumes`` counted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    group_id TEXT,
    created_at TEXT NOT NULL,
    recipe_name TEXT NOT NULL,
    target REAL,
    seed INTEGER,
    outcome TEXT NOT NULL,
    detail TEXT,
    time_to_accuracy_s REAL,
    best_accuracy REAL,
    device TEXT,
    recipe_json TEXT NOT NULL,
    env_json TEXT NOT NULL,
    curve_json TEXT NOT NULL DEFAULT '[]',
    summary_json TEXT NOT NULL DEFAULT '{}',
    pid INTEGER,
    host TEXT,
    resumes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_recipe ON runs (recipe_name, created_at);
CREATE INDEX IF NOT EXISTS runs_group ON runs (group_id);
-- Evaluation points of unfinished runs, appended as measured (rowid order); moved into
-- runs.curve_json when the run ends.
CREATE TABLE IF NOT EXISTS run_points (
    run_id TEXT NOT NULL,
    point_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS run_points_run ON run_points (run_id);
-- Ablations (speedrun ablate): the plan, its progress and result; the runs are linked by variant and seed.
CREATE TABLE IF NOT EXISTS ablations (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    recipe_name TEXT NOT NULL,
    plan_key TEXT NOT NULL,
    status TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    result_json TEXT
);
CREATE INDEX IF NOT EXISTS ablations_key ON ablations (plan_key, created_at);
CREATE TABLE IF NOT EXISTS ablation_runs (
    ablation_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    role TEXT NOT NULL,
    epochs REAL,
    PRIMARY KEY (ablation_id, run_id)
);
-- Measurements taken after a run, outside its clock (e.g. inference latency).
CREATE TABLE IF NOT EXISTS run_metrics (
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""

OUTCOMES = ("running", "reached", "completed", "budget_exhausted", "diverged", "pruned", "interrupted", "failed",
            "lost")
# Columns newer than the first schema.
_ADDED_COLUMNS = {"runs": {"pid": "INTEGER", "host": "TEXT", "resumes": "INTEGER NOT NULL DEFAULT 0"}}
RESUMABLE = ("interrupted", "lost", "failed")  # outcomes a run can be resumed from, given a checkpoint


class StoreError(RuntimeError):
    pass


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


class RunStore:
    """The run store at ``path``, created when missing; with ``existing=True`` (commands that only
    read) a missing store is an error rather than created, and one that cannot be written (a read-only
    file system, another user's file) is opened read-only."""

    def __init__(self, path: str | Path, *, existing: bool = False) -> None:
        self.path = Path(path).expanduser()
        if existing and not self.path.is_file():
            what = "is not a file" if self.path.exists() else "does not exist"
            raise StoreError(f"no run store at {self.path}: it {what} (nothing recorded there yet? "
                             "check --store or SPEEDRUN_STORE)")
        try:
            if existing and not _writable(self.path):
                self._db = _connect_read_only(self.path)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=30)
                _use_wal(self._db, self.path)
                self._db.executescript(_SCHEMA)
                _migrate(self._db)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the run store at {self.path}: {e} ({_remedy(e)})") from None
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, params: tuple) -> None:
        self._write_many([(sql, params)])

    def _write_many(self, statements: list[tuple[str, tuple]]) -> None:
        """Run ``statements`` in one transaction: all or none."""
        try:
            with self._db:
                for sql, params in statements:
                    self._db.execute(sql, params)
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to the run store at {self.path}: {e} ({_remedy(e)})") from None

    def _read(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        """All rows of a query; a damaged file is a StoreError, not a traceback."""
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the run store at {self.path}: {e} ({_remedy(e)})") from None

    def start_run(self, *, run_id: str, recipe_name: str, recipe: dict, env: dict, target: float | None,
                  seed: int, group_id: str | None = None) -> None:
        """Insert the run as ``running``, owned by this process on this host (so it can be found lost)."""
        self._write(
            "INSERT INTO runs (id, group_id, created_at, recipe_name, target, seed, outcome, device,"
            " recipe_json, env_json, pid, host) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
            (run_id, group_id, datetime.now(timezone.utc).isoformat(timespec="seconds"), recipe_name,
             target, seed, env.get("device_name"), json.dumps(recipe), json.dumps(env), os.getpid(),
             socket.gethostname()))

    @property
    def checkpoint_dir(self) -> Path:
        """Where the runs of this store keep their checkpoints: ``checkpoints/`` beside the store."""
        return self.path.parent / "checkpoints"

    def checkpoint_path(self, run_id: str) -> Path:
        return self.checkpoint_dir / f"{run_id}.pt"

    def resume_run(self, run: dict[str, Any], *, env: dict, curve: list[dict]) -> None:
        """Make ``run`` (as read by ``get_run``: interrupted, failed or lost) ``running`` again, owned by this
        process, with one more resume and its curve cut back to ``curve`` (the points its checkpoint
        holds; those measured after it are measured again). One transaction; StoreError if another
        process resumed the run since it was read."""
        claim = ("UPDATE runs SET outcome = 'running', detail = NULL, time_to_accuracy_s = NULL, best_accuracy = NULL,"
                 " summary_json = '{}', curve_json = '[]', env_json = ?, pid = ?, host = ?, resumes = resumes + 1"
                 " WHERE id = ? AND (outcome IN ('interrupted', 'failed', 'lost')"
                 " OR (outcome = 'running' AND pid IS ? AND host IS ?))")  # lost, not yet marked so
        try:
            with self._db:
                claimed = self._db.execute(claim, (json.dumps(env), os.getpid(), socket.gethostname(), run["id"],
                                                   run.get("pid"), run.get("host"))).rowcount
                if claimed:
                    self._db.execute("DELETE FROM run_points WHERE run_id = ?", (run["id"],))
                    self._db.executemany("INSERT INTO run_points (run_id, point_json) VALUES (?, ?)",
                                         [(run["id"], json.dumps(p)) for p in curve])
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to the run store at {self.path}: {e} ({_remedy(e)})") from None
        if not claimed:
            raise StoreError(f"run {run['id']} was resumed or changed by another process meanwhile")

    def add_point(self, run_id: str, point: dict) -> None:
        """Append one evaluation point of a running run: a single INSERT, committed (WAL: no fsync)."""
        self._write("INSERT INTO run_points (run_id, point_json) VALUES (?, ?)", (run_id, json.dumps(point)))

    def finish_run(self, run_id: str, *, outcome: str, detail: str, summary: dict, curve: list[dict]) -> None:
        """Record how the run ended. When that cannot be written (a full disk), the run is marked
        ``failed`` with the reason if that much still fits, and StoreError is raised either way: left
        ``running``, the run would read back as ``lost``, as if its process had been killed."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        try:
            self._write_many([
                ("UPDATE runs SET outcome = ?, detail = ?, time_to_accuracy_s = ?, best_accuracy = ?,"
                 " summary_json = ?, curve_json = ? WHERE id = ?",
                 (outcome, detail, summary.get("time_to_accuracy_s"), summary.get("best_accuracy"),
                  json.dumps(summary), json.dumps(curve), run_id)),
                ("DELETE FROM run_points WHERE run_id = ?", (run_id,))])  # the full curve is in curve_json now
        except StoreError as e:
            note = f"ended {outcome} ({detail}), but its result could not be recorded: {e}"
            with contextlib.suppress(StoreError):  # a one-row update may fit where the curve did not
                self._write("UPDATE runs SET outcome = 'failed', detail = ? WHERE id = ? AND outcome = 'running'",
                            (note, run_id))
            raise

    def mark_lost(self) -> list[str]:
        """Record every run that reads back as ``lost`` as such, with its partial curve; their ids.

        Listing never writes; this makes the verdict permanent, so a later process that happens to
        reuse the dead run's pid cannot make it look ``running`` again.
        """
        rows = self._read("SELECT * FROM runs WHERE outcome = 'running'")
        lost = [run for run in map(self._row, rows) if run["outcome"] == "lost"]
        for run in lost:
            self._write_many([
                ("UPDATE runs SET outcome = 'lost', detail = ?, best_accuracy = ?, curve_json = ?"
                 " WHERE id = ? AND outcome = 'running'",
                 (run["detail"], run["best_accuracy"], json.dumps(run["curve"]), run["id"])),
                ("DELETE FROM run_points WHERE run_id = ?", (run["id"],))])
        return [run["id"] for run in lost]

    def list_runs(self, *, recipe: str | None = None, outcome: str | None = None, group: str | None = None,
                  limit: int | None = 50) -> list[dict[str, Any]]:
        """Stored runs, newest first. ``outcome`` filters on the outcome as read back: a ``running`` run
        whose process is gone from this host counts as ``lost``."""
        live = outcome in ("running", "lost")  # decided per row, after reading, so LIMIT comes after too
        where, params = [], []
        for column, value in (("recipe_name", recipe), ("outcome", None if live else outcome), ("group_id", group)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if live:
            where.append("outcome IN ('running', 'lost')")
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, rowid DESC" + (f" LIMIT {int(limit)}" if limit and not live else "")
        runs = [self._row(r) for r in self._read(sql, params)]
        if live:
            runs = [r for r in runs if r["outcome"] == outcome][:limit or None]
        return runs

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The run whose id starts with ``run_id`` (a unique prefix is enough)."""
        rows = self._read("SELECT * FROM runs WHERE id LIKE ? LIMIT 2", (run_id + "%",))
        if not rows:
            raise StoreError(f"no run with id {run_id!r} in {self.path}")
        if len(rows) > 1:
            raise StoreError(f"run id prefix {run_id!r} is ambiguous; give more characters")
        return self._row(rows[0])

    def find_group(self, group_id: str) -> str | None:
        """The group id (a multi-seed train or an ablation) that starts with ``group_id``; None when no
        run has one, StoreError when several do."""
        rows = self._read("SELECT DISTINCT group_id FROM runs WHERE group_id LIKE ? LIMIT 2", (group_id + "%",))
        if len(rows) > 1:
            raise StoreError(f"group id prefix {group_id!r} is ambiguous; give more characters")
        return rows[0][0] if rows else None

    def _row(self, row: sqlite3.Row) -> dict[str, Any]:
        """A stored run as a dict. An unfinished run gets its curve so far from ``run_points``, and
        reads as ``lost`` when it was started on this host by a process that no longer exists; runs of
        other hosts, or stored before pids were recorded, cannot be checked and stay ``running``."""
        run = dict(row)
        for key in ("recipe", "env", "curve", "summary"):
            run[key] = json.loads(run.pop(f"{key}_json"))
        run.setdefault("resumes", 0)  # a store of an older schema opened read-only (not migrated)
        if run["outcome"] != "running":
            run["resumable"] = run["outcome"] in RESUMABLE and self.checkpoint_path(run["id"]).is_file()
            return run
        run["resumable"] = False
        run["curve"] = [json.loads(p) for (p,) in self._read(
            "SELECT point_json FROM run_points WHERE run_id = ? ORDER BY rowid", (run["id"],))]
        pid = run.get("pid")  # absent from a store of the first schema opened read-only (not migrated)
        if run.get("host") == socket.gethostname() and pid is not None and not _process_alive(pid):
            # Why is not known: a SIGKILL, the OOM killer, or a store too full to take the outcome.
            run["outcome"] = "lost"
            run["detail"] = (f"process {pid} on {run['host']} ended without recording an outcome (killed "
                             f"outright, or the store could not be written); {len(run['curve'])} evaluation "
                             "point(s) kept")
            run["best_accuracy"] = max((p["accuracy"] for p in run["curve"]), default=None)
            run["resumable"] = self.checkpoint_path(run["id"]).is_file()
        return run

    # ------------------------------------------------------------ ablations and run metrics

    def start_ablation(self, *, ablation_id: str, recipe_name: str, plan: dict, plan_key: str) -> None:
        now = _now()
        self._write("INSERT INTO ablations (id, created_at, updated_at, recipe_name, plan_key, status, plan_json)"
                    " VALUES (?, ?, ?, ?, ?, 'running', ?)",
                    (ablation_id, now, now, recipe_name, plan_key, json.dumps(plan)))

    def finish_ablation(self, ablation_id: str, *, status: str, result: dict | None) -> None:
        self._write("UPDATE ablations SET status = ?, updated_at = ?, result_json = ? WHERE id = ?",
                    (status, _now(), None if result is None else json.dumps(result), ablation_id))

    def get_ablation(self, ablation_id: str) -> dict[str, Any]:
        """The ablation whose id starts with ``ablation_id`` (a unique prefix is enough)."""
        rows = self._read("SELECT * FROM ablations WHERE id LIKE ? LIMIT 2", (ablation_id + "%",))
        if not rows:
            raise StoreError(f"no ablation with id {ablation_id!r} in {self.path}")
        if len(rows) > 1:
            raise StoreError(f"ablation id prefix {ablation_id!r} is ambiguous; give more characters")
        return self._ablation_row(rows[0])

    def find_ablation(self, plan_key: str) -> dict[str, Any] | None:
        """The newest ablation with this plan (the same command run again), or None."""
        rows = self._read("SELECT * FROM ablations WHERE plan_key = ? ORDER BY created_at DESC, rowid DESC"
                          " LIMIT 1", (plan_key,))
        return self._ablation_row(rows[0]) if rows else None

    def list_ablations(self, *, limit: int | None = 50) -> list[dict[str, Any]]:
        sql = "SELECT * FROM ablations ORDER BY created_at DESC, rowid DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [self._ablation_row(r) for r in self._read(sql)]

    def link_ablation_run(self, ablation_id: str, *, run_id: str, variant: str, seed: int, role: str,
                          epochs: float | None = None) -> None:
        self._write("INSERT OR REPLACE INTO ablation_runs (ablation_id, run_id, variant, seed, role, epochs)"
                    " VALUES (?, ?, ?, ?, ?, ?)", (ablation_id, run_id, variant, seed, role, epochs))

    def ablation_runs(self, ablation_id: str) -> list[dict[str, Any]]:
        """The runs of an ablation, oldest first, each a stored run plus ``variant``, ``role``, ``schedule_epochs``."""
        rows = self._read(
            "SELECT runs.*, a.variant AS variant, a.role AS role, a.epochs AS schedule_epochs"
            " FROM ablation_runs a JOIN runs ON runs.id = a.run_id WHERE a.ablation_id = ?"
            " ORDER BY runs.created_at, runs.rowid", (ablation_id,))
        return [self._row(r) for r in rows]

    def set_metric(self, run_id: str, name: str, value: float) -> None:
        self._write("INSERT OR REPLACE INTO run_metrics (run_id, name, value) VALUES (?, ?, ?)",
                    (run_id, name, float(value)))

    def metrics(self, run_ids: list[str] | None = None) -> dict[str, dict[str, float]]:
        """``{run_id: {name: value}}`` for the given runs (all runs when None)."""
        if run_ids is None:
            rows = self._read("SELECT run_id, name, value FROM run_metrics")
        else:
            rows = []
            for i in range(0, len(run_ids), 500):  # stay under SQLite's bound-parameter limit
                chunk = run_ids[i:i + 500]
                rows += self._read("SELECT run_id, name, value FROM run_metrics WHERE run_id IN"
                                   f" ({', '.join('?' * len(chunk))})", chunk)
        found: dict[str, dict[str, float]] = {}
        for run_id, name, value in rows:
            found.setdefault(run_id, {})[name] = value
        return found

    @staticmethod
    def _ablation_row(row: sqlite3.Row) -> dict[str, Any]:
        ablation = dict(row)
        ablation["plan"] = json.loads(ablation.pop("plan_json"))
        result = ablation.pop("result_json")
        ablation["result"] = json.loads(result) if result else None
        return ablation


def _remedy(e: Exception) -> str:
    """What to do about an error opening or reading the store, for its one-line message."""
    if isinstance(e, sqlite3.DatabaseError) and any(w in str(e) for w in ("malformed", "not a database")):
        return "the file is damaged: move it aside to start a new store; `sqlite3 FILE .recover` may save its runs"
    if isinstance(e, sqlite3.Error) and "full" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
        return "free space on its disk, or set --store or SPEEDRUN_STORE to a file on another disk"
    return "set --store or SPEEDRUN_STORE to a writable file"


def _writable(path: Path) -> bool:
    """Whether the store and its folder (SQLite's journal and WAL files live beside it) can be written;
    False on a read-only file system even for root."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never writes. A WAL store needs its shared-memory file even to read it; where
    that cannot be created (a read-only file system) the file is read as immutable, which is safe there
    because nothing can change it."""
    uri = path.resolve().as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        return sqlite3.connect(f"{uri}?immutable=1", uri=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _use_wal(db: sqlite3.Connection, path: Path) -> None:
    """Write-ahead logging: a commit appends to the log without fsync (synchronous=NORMAL: durable
    against a killed process, which is what the per-evaluation writes guard against, not against
    power loss), and readers (``speedrun runs`` during a run) never block the run's writes. On a
    network file system (WAL's shared memory is not coherent across hosts) or where WAL is
    unavailable, the store keeps its rollback journal: correct, with commits of ~20 ms."""
    if _network_fs(path):
        return
    with contextlib.suppress(sqlite3.Error):
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
            db.execute("PRAGMA synchronous=NORMAL")


NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "fuse.sshfs")


def _network_fs(path: Path, mounts_text: str | None = None) -> bool:
    """Whether ``path`` lies on a network file system, by the longest matching mount in
    ``mounts_text`` (default: /proc/mounts, Linux); False where that cannot be told."""
    try:
        text = Path("/proc/mounts").read_text() if mounts_text is None else mounts_text
        mounts = [line.split()[1:3] for line in text.splitlines() if len(line.split()) >= 3]
        target = str(path.resolve())
    except OSError:
        return False
    found = [(len(m), kind) for m, kind in mounts if target == m or target.startswith(m.rstrip("/") + "/")]
    return bool(found) and max(found)[1] in NETWORK_FS


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns a store created by an older speedrun lacks (new tables come from the schema)."""
    for table, columns in _ADDED_COLUMNS.items():
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns.items():
            if name not in have:
                try:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as e:  # another process migrated it first
                    if "duplicate column" not in str(e):
                        raise
    db.commit()


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (and is not a zombie awaiting its parent).

    Off POSIX the answer is always True (unknown): ``os.kill`` there would terminate the process.
    """
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    with contextlib.suppress(OSError, IndexError):  # Linux: a killed child not yet reaped is a zombie
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
