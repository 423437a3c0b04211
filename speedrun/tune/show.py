"""Reading a study back: its trials, best-so-far against time, parameter importances, confirmations."""
from __future__ import annotations

import math
from typing import Any

from speedrun.tune import objective as obj


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial (surplus trials, never run, left out), oldest first."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("outcome") == "surplus":
            continue
        rows.append({"trial": t.number, "state": t.state.name.lower(), "outcome": a.get("outcome") or t.state.name.lower(),
                     "value": t.value, "time_s": a.get("time_s"), "best_accuracy": a.get("best_accuracy"),
                     "ran_s": a.get("total_time_s"), "run_id": a.get("run_id"), "seed": a.get("seed"),
                     "detail": a.get("detail") or "", "params": dict(t.params),
                     "finished_at": t.datetime_complete.timestamp() if t.datetime_complete else None})
    return rows


def best_so_far(study) -> list[dict[str, Any]]:
    """Each improvement of the best time-to-target: seconds since the study began, trial, time."""
    start = study.user_attrs.get("created_at")
    rows = sorted((r for r in trial_rows(study) if r["finished_at"] is not None), key=lambda r: r["finished_at"])
    if start is None and rows:
        start = rows[0]["finished_at"]
    found, best = [], math.inf
    for r in rows:
        if r["state"] == "complete" and obj.is_hit(r["value"]) and r["value"] < best:
            best = r["value"]
            found.append({"at_s": r["finished_at"] - start, "trial": r["trial"], "time_s": best})
    return found


def importances(study) -> dict[str, float] | str:
    """Optuna's parameter importances (fANOVA) for log(score) over the finished trials, or why none."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 3:
        return f"needs 3 finished trials ({len(done)} so far)"
    try:
        return optuna.importance.get_param_importances(study, target=lambda t: math.log(t.value))
    except (RuntimeError, ValueError) as e:
        return f"not computed: {e}"


def confirmations(study) -> list[dict[str, Any]]:
    found = []
    for key, value in study.user_attrs.items():
        if key.startswith("confirm:"):
            _, trial, seed = key.split(":")
            found.append({"trial": int(trial), "seed": int(seed), **value})
    return sorted(found, key=lambda c: (c["trial"], c["seed"]))


def study_summary(study) -> dict[str, Any]:
    from speedrun.tune.study import counts

    identity = study.user_attrs.get("identity") or {}
    return {"study": study.study_name, "recipe": identity.get("recipe_name"), "target": identity.get("target"),
            "val_frac": identity.get("val_frac"), "data": identity.get("data"), "space": identity.get("space"),
            "counts": counts(study), "trials": trial_rows(study), "best_so_far": best_so_far(study),
            "importances": importances(study), "confirmations": confirmations(study),
            "test": study.user_attrs.get("test")}
