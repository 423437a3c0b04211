"""One local worker of ``speedrun tune --workers N``: ``python -m speedrun.tune.worker PLAN.json INDEX
DEADLINE SPAWNED_AT``. It runs search trials on the study until it is done, then exits (the command
that started it confirms and tests). Ctrl-C ends it with code 130 after recording its trial."""
from __future__ import annotations

import json
import signal
import sys
import time


def main(argv: list[str]) -> int:
    path, index, deadline, spawned_at = argv
    from speedrun.cli import _sigterm_as_interrupt
    from speedrun.config import ConfigError
    from speedrun.data import DataError
    from speedrun.store import RunStore, StoreError
    from speedrun.tune import storage as stores
    from speedrun.tune.study import TuneInterrupted, open_study, plan_from_json, search

    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    with open(path) as f:
        plan = plan_from_json(json.load(f))
    storage = stores.open_storage(plan.storage_url)
    from speedrun.paths import default_store

    run_store = RunStore(plan.store or default_store())
    worker = int(index)
    # Process start-up (interpreter, imports, storage): tuning overhead, recorded once per worker.
    open_study(plan, storage, worker=worker).set_user_attr(f"worker_start_s:{worker}:{spawned_at}",
                                                          time.time() - float(spawned_at))
    try:
        search(plan, storage, worker=worker, deadline=float(deadline) if deadline else None,
               say=lambda line: print(f"[w{worker}] {line}", flush=True), run_store=run_store)
    except (TuneInterrupted, KeyboardInterrupt):
        return 130
    except (ConfigError, DataError, StoreError) as e:
        print(f"speedrun: error: worker {worker}: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
