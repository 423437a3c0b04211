"""The run store: one embedded SQLite database of runs (``$SPEEDRUN_HOME/runs.sqlite`` by default).

A run is inserted when it starts (outcome ``running``) and updated when it ends, so a run that is
interrupted or fails is still there with its curve so far.
"""
from __future__ import annotations

import json
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
    summary_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS runs_recipe ON runs (recipe_name, created_at);
CREATE INDEX IF NOT EXISTS runs_group ON runs (group_id);
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

OUTCOMES = ("running", "reached", "budget_exhausted", "diverged", "interrupted", "failed")


class StoreError(RuntimeError):
    pass


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


class RunStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the run store at {self.path}: {e} "
                             "(set --store or SPEEDRUN_STORE to a writable file)") from None
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, params: tuple) -> None:
        try:
            with self._db:
                self._db.execute(sql, params)
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to the run store at {self.path}: {e}") from None

    def start_run(self, *, run_id: str, recipe_name: str, recipe: dict, env: dict, target: float | None,
                  seed: int, group_id: str | None = None) -> None:
        self._write(
            "INSERT INTO runs (id, group_id, created_at, recipe_name, target, seed, outcome, device,"
            " recipe_json, env_json) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
            (run_id, group_id, datetime.now(timezone.utc).isoformat(timespec="seconds"), recipe_name,
             target, seed, env.get("device_name"), json.dumps(recipe), json.dumps(env)))

    def finish_run(self, run_id: str, *, outcome: str, detail: str, summary: dict, curve: list[dict]) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self._write(
            "UPDATE runs SET outcome = ?, detail = ?, time_to_accuracy_s = ?, best_accuracy = ?,"
            " summary_json = ?, curve_json = ? WHERE id = ?",
            (outcome, detail, summary.get("time_to_accuracy_s"), summary.get("best_accuracy"),
             json.dumps(summary), json.dumps(curve), run_id))

    def list_runs(self, *, recipe: str | None = None, outcome: str | None = None, group: str | None = None,
                  limit: int | None = 50) -> list[dict[str, Any]]:
        where, params = [], []
        for column, value in (("recipe_name", recipe), ("outcome", outcome), ("group_id", group)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, rowid DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [self._row(r) for r in self._db.execute(sql, params)]

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The run whose id starts with ``run_id`` (a unique prefix is enough)."""
        rows = self._db.execute("SELECT * FROM runs WHERE id LIKE ? LIMIT 2", (run_id + "%",)).fetchall()
        if not rows:
            raise StoreError(f"no run with id {run_id!r} in {self.path}")
        if len(rows) > 1:
            raise StoreError(f"run id prefix {run_id!r} is ambiguous; give more characters")
        return self._row(rows[0])

    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        run = dict(row)
        for key in ("recipe", "env", "curve", "summary"):
            run[key] = json.loads(run.pop(f"{key}_json"))
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
        rows = self._db.execute("SELECT * FROM ablations WHERE id LIKE ? LIMIT 2", (ablation_id + "%",)).fetchall()
        if not rows:
            raise StoreError(f"no ablation with id {ablation_id!r} in {self.path}")
        if len(rows) > 1:
            raise StoreError(f"ablation id prefix {ablation_id!r} is ambiguous; give more characters")
        return self._ablation_row(rows[0])

    def find_ablation(self, plan_key: str) -> dict[str, Any] | None:
        """The newest ablation with this plan (the same command run again), or None."""
        row = self._db.execute("SELECT * FROM ablations WHERE plan_key = ? ORDER BY created_at DESC, rowid DESC"
                               " LIMIT 1", (plan_key,)).fetchone()
        return self._ablation_row(row) if row else None

    def list_ablations(self, *, limit: int | None = 50) -> list[dict[str, Any]]:
        sql = "SELECT * FROM ablations ORDER BY created_at DESC, rowid DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [self._ablation_row(r) for r in self._db.execute(sql)]

    def link_ablation_run(self, ablation_id: str, *, run_id: str, variant: str, seed: int, role: str,
                          epochs: float | None = None) -> None:
        self._write("INSERT OR REPLACE INTO ablation_runs (ablation_id, run_id, variant, seed, role, epochs)"
                    " VALUES (?, ?, ?, ?, ?, ?)", (ablation_id, run_id, variant, seed, role, epochs))

    def ablation_runs(self, ablation_id: str) -> list[dict[str, Any]]:
        """The runs of an ablation, oldest first, each a stored run plus ``variant``, ``role``, ``schedule_epochs``."""
        rows = self._db.execute(
            "SELECT runs.*, a.variant AS variant, a.role AS role, a.epochs AS schedule_epochs"
            " FROM ablation_runs a JOIN runs ON runs.id = a.run_id WHERE a.ablation_id = ?"
            " ORDER BY runs.created_at, runs.rowid", (ablation_id,)).fetchall()
        return [self._row(r) for r in rows]

    def set_metric(self, run_id: str, name: str, value: float) -> None:
        self._write("INSERT OR REPLACE INTO run_metrics (run_id, name, value) VALUES (?, ?, ?)",
                    (run_id, name, float(value)))

    def metrics(self, run_ids: list[str] | None = None) -> dict[str, dict[str, float]]:
        """``{run_id: {name: value}}`` for the given runs (all runs when None)."""
        if run_ids is None:
            rows = self._db.execute("SELECT run_id, name, value FROM run_metrics").fetchall()
        else:
            rows = []
            for i in range(0, len(run_ids), 500):  # stay under SQLite's bound-parameter limit
                chunk = run_ids[i:i + 500]
                rows += self._db.execute("SELECT run_id, name, value FROM run_metrics WHERE run_id IN"
                                         f" ({', '.join('?' * len(chunk))})", chunk).fetchall()
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
