"""Where a study lives: the embedded default (an Optuna journal file) or a database URL.

The default is ``$SPEEDRUN_HOME/tune.journal``, Optuna's journal file: an append-only log of study
operations written under a file lock, which several processes on one machine append to at once
without losing or repeating an operation (SQLite, the other embedded choice, fails such writers
with "database is locked" under contention). ``--storage`` takes a journal file path, or a
SQLAlchemy URL: ``postgresql://user@host:5432/db`` (psycopg2) for workers on many machines,
``sqlite:///path`` for one process.

A trial records its worker (host, pid) when it starts and marks itself alive every 30 s. A trial
left running by a worker that is gone (kill -9, a crash, a lost machine) is failed by the next
worker or command on the study (``fail_dead_trials``): on this host as soon as the pid is gone, on
others once it has not been marked alive for ``STALE_S``. A failed trial does not count toward
``--trials``: it is run again, never twice.
"""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

from speedrun import paths
from speedrun.store import StoreError, _process_alive

STALE_S = 600.0  # a trial on another host not marked alive for this long is taken as dead
SQL_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite")


def default_journal() -> Path:
    return paths.home() / "tune.journal"


def describe(url: str | None) -> str:
    """The storage as shown to people: a URL's password masked."""
    if url is None:
        return f"journal file {default_journal()}"
    if not is_sql(url):
        return f"journal file {url.removeprefix('journal:')}"
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def is_sql(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES and "://" in url


def open_storage(url: str | None, *, create: bool = True):
    """The Optuna storage for ``url`` (None: the default journal file). StoreError, one line, when it
    cannot be opened or reached; with ``create=False`` a journal file that does not exist is an error
    rather than created (commands that only read)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url is not None and is_sql(url):
        return _open_sql(url)
    path = Path(url[len("journal:"):] if url and url.startswith("journal:") else url or default_journal())
    path = path.expanduser()
    if not create and not path.is_file():
        raise StoreError(f"no study storage at {path} (nothing tuned there yet? check --storage)")
    if path.is_dir():
        raise StoreError(f"study storage {path} is a folder; give a file (or a postgresql:// URL)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise StoreError(f"cannot open the study storage {path}: {e.strerror or e}") from None


def _open_sql(url: str):
    from optuna.storages import RDBStorage

    kwargs: dict[str, Any] = {}
    given = url
    if url.startswith(("postgresql", "postgres")):
        kwargs = {"connect_args": {"connect_timeout": 10}}
        # The driver speedrun installs (speedrun[postgres]) is psycopg 3; SQLAlchemy 2.0 would pick psycopg2.
        url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)
    try:
        return RDBStorage(url, engine_kwargs=kwargs)
    except ImportError as e:  # no driver
        raise StoreError(f"cannot use the study storage {describe(given)}: {e} (pip install 'speedrun[postgres]' "
                         "for postgresql://)") from None
    except Exception as e:  # sqlalchemy's OperationalError and kin: unreachable, refused, bad credentials
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"cannot reach the study storage {describe(given)}: {first}") from None


def fail_dead_trials(study, storage, *, now: float | None = None) -> list[int]:
    """Fail every running trial whose worker is gone (module docstring); the trial numbers failed."""
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        alive_at = t.user_attrs.get("alive_at") or (t.datetime_start.timestamp() if t.datetime_start else now)
        stale = now - alive_at > STALE_S
        if worker.get("host") == host:
            gone = not _process_alive(int(worker["pid"])) or stale
            why = f"worker process {worker['pid']} on {host} ended without finishing the trial"
        else:
            gone = stale
            why = f"worker {worker.get('pid', '?')} on {worker.get('host', '?')} not seen for {now - alive_at:.0f} s"
        if not gone:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "outcome", "lost")
            storage.set_trial_user_attr(t._trial_id, "detail", why)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
        except (RuntimeError, ValueError):  # finished meanwhile (another worker failed it first)
            continue
    return failed
