"""``speedrun report``: one self-contained HTML page over the run store.

Sections: a DAWNBench-style leaderboard (median time-to-accuracy per recipe x hardware x precision,
its cost at ``--price-per-hour``, single-image inference latency where it was measured, the
framework), accuracy-vs-time curves of chosen runs, the waterfall of an ablation from its
baseline to the full recipe on a log time axis with its table, and every run's environment.

The page has inline CSS and its plots inline as base64 PNGs (also written beside it as files), so
it can be mailed or archived alone. Latency is shown only where it was measured (``speedrun
ablate`` times the trained model one image at a time); models are not stored, so it cannot be
measured afterwards and the page says "not measured" instead.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from speedrun.config import ConfigError
from speedrun.console import new_console, plural
from speedrun.store import RunStore, StoreError

MAX_CURVES = 12  # more lines than this make the plot unreadable
ENV_FIELDS = ("device_name", "cpu_model", "cpu_capability", "threads", "precision", "torch_version", "python",
              "platform", "code_version")


@dataclass(frozen=True)
class Report:
    path: Path  # the HTML file
    plots: tuple[Path, ...]
    runs: int
    leaderboard_rows: int
    ablation_id: str | None
    seconds: float


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "", raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def leaderboard(runs: Sequence[Mapping[str, Any]], metrics: Mapping[str, Mapping[str, float]], *,
                price_per_hour: float | None) -> list[dict[str, Any]]:
    """One row per recipe x hardware x precision: median time-to-accuracy, cost, latency, framework.

    Rows are ranked only against rows on the same dataset to the same target (the set with the most
    runs first); recipes are named as ``speedrun compare`` names them.
    """
    from speedrun.compare import group_runs, like_with_like

    by = ("recipe", "device", "precision")
    index = {r["id"]: r for r in runs}
    rows = []
    rest = list(runs)
    while True:
        chosen, dataset, _, left = like_with_like(rest)
        if not chosen:
            break
        rows += _leaderboard_rows(group_runs(chosen, by), index, dataset, metrics, price_per_hour)
        left_ids = {i for x in left for i in x["runs"]}
        rest = [r for r in rest if r["id"] in left_ids]
    return rows


def _leaderboard_rows(groups, index: Mapping[str, Mapping[str, Any]], dataset: str | None,
                      metrics: Mapping[str, Mapping[str, float]], price_per_hour: float | None
                      ) -> list[dict[str, Any]]:
    rows = []
    for rank, g in enumerate(groups, 1):
        members = [index[i] for i in g.run_ids]
        latencies = [metrics[i]["inference_latency_s"] for i in g.run_ids
                     if "inference_latency_s" in metrics.get(i, {})]
        reached = [t for t in g.sample.times if t is not None]
        rows.append({
            "rank": rank if g.median_s is not None else None, "recipe": g.names[0], "hardware": g.key[1],
            "precision": g.key[2], "dataset": dataset, "target": members[0]["target"], "runs": len(members),
            "pass_rate": g.sample.pass_rate, "median_s": g.median_s,
            "min_s": min(reached, default=None), "max_s": max(reached, default=None),
            "best_accuracy": g.sample.median_best_accuracy,
            "cost": None if price_per_hour is None or g.median_s is None else g.median_s / 3600 * price_per_hour,
            "latency_s": statistics.median(latencies) if latencies else None,
            "framework": Counter(f"torch {(r.get('env') or {}).get('torch_version', '?')}"
                                 for r in members).most_common(1)[0][0],
            "threads": Counter(str((r.get("env") or {}).get("threads", "?")) for r in members).most_common(1)[0][0],
            "mfu": _median_of(members, "mfu"), "mfu_theoretical": _median_of(members, "mfu_theoretical"),
            "fastest_run": min((r for r in members if r["outcome"] == "reached"),
                               key=lambda r: r["time_to_accuracy_s"], default=members[0])["id"],
        })
    return rows


def _median_of(runs: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [v for r in runs if (v := (r.get("summary") or {}).get(key)) is not None]
    return statistics.median(values) if values else None


def _select_runs(store: RunStore, *, run_ids: Sequence[str] | None, group: str | None) -> list[dict[str, Any]]:
    if run_ids:
        return [store.get_run(r) for r in run_ids]
    return store.list_runs(group=group, limit=None)


def _pick_ablation(store: RunStore, *, ablation: str | None, group: str | None,
                   runs: Sequence[Mapping[str, Any]] | None = None) -> str | None:
    """``ablation`` if given; else ``group`` if it is one; else, for chosen ``runs``, the newest
    ablation they belong to (none if they belong to none); else the newest ablation."""
    if ablation:
        return store.get_ablation(ablation)["id"]
    if group:
        try:
            return store.get_ablation(group)["id"]
        except StoreError:
            return None
    if runs is not None:
        for group_id in dict.fromkeys(r.get("group_id") for r in runs if r.get("group_id")):
            try:
                return store.get_ablation(group_id)["id"]
            except StoreError:
                continue
        return None
    latest = store.list_ablations(limit=1)
    return latest[0]["id"] if latest else None


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
.meta{color:#666} table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.nw{white-space:nowrap} .na{color:#999;font-style:italic}
.never{color:#b22;font-weight:600} img.plot{max-width:100%;border:1px solid #eee}
.scroll{max-height:480px;overflow:auto} .note{color:#555;font-size:12px}
"""

# Sets data-plots="loaded/total" on <body> once the page has loaded, for headless checks.
CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-plots', ok + '/' + imgs.length);
});
"""


def _img(name: str, png: bytes, alt: str) -> str:
    return (f'<img class="plot" id="plot-{_e(name)}" alt="{_e(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def build_report(store: RunStore, *, out: str | Path = "speedrun-report", run_ids: Sequence[str] | None = None,
                 group: str | None = None, ablation: str | None = None,
                 price_per_hour: float | None = None) -> Report:
    """Write ``out/index.html`` (and its plots as PNG files beside it) and return what was written.

    ``run_ids`` or ``group`` choose the runs (default: every stored run); the curves show those runs
    when chosen, else the fastest run of each of the best leaderboard rows. ``ablation`` chooses the
    ablation (default: ``group`` when it is one; with ``run_ids``, an ablation those runs belong to;
    else the newest).
    """
    from speedrun.ablate import load_result
    from speedrun.report.plots import curves_png, study_png, waterfall_png

    start = time.perf_counter()
    if price_per_hour is not None and price_per_hour < 0:
        raise ConfigError("--price-per-hour must be >= 0")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write the report to {out}: {e}") from None
    runs = _select_runs(store, run_ids=run_ids, group=group)
    metrics = store.metrics([r["id"] for r in runs])
    # A tuning study's search trials (each its own recipe, judged on validation) are plotted as the study's,
    # not ranked: its confirmation and test runs are.
    board = leaderboard([r for r in runs if metrics.get(r["id"], {}).get("tune_role") != 0.0], metrics,
                        price_per_hour=price_per_hour)
    index = {r["id"]: r for r in runs}

    if run_ids or group:
        chosen = runs[:MAX_CURVES]
    else:
        chosen = [index[row["fastest_run"]] for row in board[:MAX_CURVES]]
    plots: dict[str, bytes] = {}
    if chosen:
        plots["curves"] = curves_png(chosen)
    ablation_id = _pick_ablation(store, ablation=ablation, group=group, runs=runs if run_ids else None)
    result = load_result(store, ablation_id, resamples=2000) if ablation_id else None
    if result is not None:
        png = waterfall_png(result)
        if png:
            plots["waterfall"] = png
    studies = _studies(runs, metrics)
    for name, trials in studies.items():
        plots[f"study-{_slug(name)}"] = study_png(trials, title=f"study {name}: {len(trials)} trials")
    files = []
    for name, png in plots.items():
        (out / f"{name}.png").write_bytes(png)
        files.append(out / f"{name}.png")

    parts = [f"<h1>speedrun report</h1><p class=meta>{len(runs)} runs from {_e(store.path)}; generated "
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>"]
    parts.append(_leaderboard_html(board, price_per_hour))
    parts.append("<h2 id=curves>Accuracy against time</h2>")
    parts.append(_img("curves", plots["curves"], "held-out accuracy against clock time") if "curves" in plots
                 else "<p class=na>no runs to plot</p>")
    parts.append(_ablation_html(result, plots.get("waterfall")))
    if studies:
        parts.append("<h2 id=studies>Tuning studies</h2><p class=note>speedrun tune: each search trial's "
                     "time-to-target on its validation split, the best so far, and trials that missed or were "
                     "pruned (on top). <code>speedrun tune show STUDY</code> has its parameters and importances.</p>")
        parts += [_img(f"study-{_slug(name)}", plots[f"study-{_slug(name)}"], f"tuning study {name}")
                  for name in studies]
    parts.append(_environment_html(runs))
    page = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>speedrun report</title>"
            "<link rel=icon href=\"data:,\"><meta name=viewport content=\"width=device-width\">"
            f"<style>{CSS}</style><script>{CHECK_JS}</script></head><body>" + "\n".join(parts) + "</body></html>")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return Report(path, tuple(files), len(runs), len(board), ablation_id, time.perf_counter() - start)


def _studies(runs: Sequence[Mapping[str, Any]], metrics: Mapping[str, Mapping[str, float]]
             ) -> dict[str, list[Mapping[str, Any]]]:
    """The search trials of each tuning study among ``runs`` (tagged by speedrun tune), oldest first."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for run in sorted(runs, key=lambda r: r["created_at"]):
        if metrics.get(run["id"], {}).get("tune_role") == 0.0 and run.get("group_id"):
            found.setdefault(run["group_id"], []).append(run)
    return found


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]


def _leaderboard_html(board: Sequence[Mapping[str, Any]], price: float | None) -> str:
    na = lambda text: f"<span class=na>{_e(text)}</span>"
    rows = []
    for row in board:
        median = _e(_s(row["median_s"])) if row["median_s"] is not None else \
            f"<span class=never>not reached</span> (best {row['best_accuracy'] or 0:.1%})"
        spread = "" if row["min_s"] is None else \
            f"<br><span class=note>{_e(_s(row['min_s']))} to {_e(_s(row['max_s']))}</span>"
        cost = f"${row['cost']:.4f}" if row["cost"] is not None else na("give --price-per-hour" if price is None else "-")
        latency = f"{row['latency_s'] * 1e3:.2f} ms" if row["latency_s"] is not None else na("not measured")
        mfu = na("-") if row["mfu"] is None else f"{row['mfu']:.0%}" + (
            "" if row["mfu_theoretical"] is None else f" / {row['mfu_theoretical']:.0%}")
        rows.append([str(row["rank"] or "-"), _e(row["recipe"]), _e(row["hardware"]), _e(row["precision"]),
                     _e(row["dataset"] or "-"), f"{row['target']:.2%}" if row["target"] else "-", median + spread, cost,
                     latency, mfu,
                     str(row["runs"]), f"{row['pass_rate']:.0%}", _e(row["framework"]), _e(row["threads"])])
    price_note = f" at ${price:g}/hour" if price is not None else ""
    if not board:
        return ("<h2 id=leaderboard>Leaderboard</h2><p class=na>no finished runs to rank: a run enters the "
                "leaderboard once it has reached its target, exhausted its budget or diverged "
                "(<code>speedrun train</code> makes one)</p>")
    return ("<h2 id=leaderboard>Leaderboard</h2><p class=note>Median time-to-accuracy over each group's runs, "
            "ranked only among rows on the same dataset to the same target (MLPerf clock: data loading, model creation, training and every evaluation until the target is "
            f"first seen); cost = that time{_e(price_note)}; inference latency = median over test images run one "
            "at a time, measured by <code>speedrun ablate</code> right after training. Models are not stored, so "
            "where it was not measured then it is shown as <i>not measured</i>, never estimated. MFU = useful "
            "FLOP/s (conv zero-padding taps excluded) over the measured matmul peak / over the theoretical peak "
            "(cores x clock x FLOP per cycle, or the GPU's datasheet), medians over the runs.</p>"
            + _table(["rank", "recipe", "hardware", "precision", "dataset", "target", "time-to-accuracy (min to max)",
                      "cost", "inference latency", "MFU measured / theoretical", "runs", "pass-rate", "framework",
                      "threads"], rows,
                     cls="leaderboard", raw=True))


def _ablation_html(result, waterfall: bytes | None) -> str:
    from speedrun.ablate import summary_lines

    if result is None:
        return ("<h2 id=ablation>Ablation</h2><p class=na>no ablation in the store: "
                "<code>speedrun ablate --recipe R --seeds 5</code> makes one</p>")
    head = (f"<h2 id=ablation>Ablation {_e(result.ablation_id)}</h2><p class=meta>{_e(result.recipe_name)} to "
            f"{result.target:.2%}, {plural(len(result.seeds), 'seed')}, {_e(result.mode)}"
            + ("" if result.complete else " &mdash; <b>incomplete</b>") + "</p>")
    img = _img("waterfall", waterfall, "ablation waterfall from baseline to full recipe") if waterfall else \
        "<p class=na>no waterfall yet: the baseline or the full recipe has no runs</p>"
    effects = [[e.technique, "full less it" if e.mode == "leave-one-out" else "baseline plus it",
                _s(e.median_with_s) if e.median_with_s is not None else "never reached",
                _s(e.median_without_s) if e.median_without_s is not None else "never reached", e.text,
                "-" if e.accuracy_effect is None else f"{e.accuracy_effect * 100:+.1f} pp",
                f"{e.pass_rate_with:.0%} / {e.pass_rate_without:.0%}"] for e in result.attribution.effects]
    variants = [[v.name, f"{v.schedule_epochs:g}", len(v.runs), f"{v.pass_rate:.0%}",
                 _s(v.median_s) if v.median_s is not None else
                 (f"never reached (best {v.best_accuracy or 0:.1%})" if v.runs else "not yet run"),
                 "-" if v.best_accuracy is None else f"{v.best_accuracy:.1%}",
                 "not measured" if v.latency_s is None else f"{v.latency_s * 1e3:.2f} ms"] for v in result.variants]
    notes = [_e(line) + (" &mdash; <b>not multiplicative</b>" if flagged else "")
             for line, flagged in summary_lines(result)]
    return (head + img + _table(["technique", "measured as", "median with", "median without", "speedup [95% CI]",
                                 "accuracy", "pass-rate with / without"], effects, cls="effects")
            + _table(["variant", "train.epochs", "runs", "pass-rate", "median time-to-accuracy", "best accuracy",
                      "latency (1 image)"], variants, cls="variants")
            + "".join(f"<p class=note>{n}</p>" for n in notes))


def _environment_html(runs: Sequence[Mapping[str, Any]]) -> str:
    envs: dict[str, int] = {}
    env_rows, run_rows = [], []
    for run in runs:
        env = run.get("env") or {}
        key = json.dumps({k: env.get(k) for k in ENV_FIELDS}, sort_keys=True)
        if key not in envs:
            envs[key] = len(envs) + 1
            env_rows.append([f"E{envs[key]}", *[env.get(k, "-") for k in ENV_FIELDS], 0])
        env_rows[envs[key] - 1][-1] += 1
        run_rows.append([run["id"], run["created_at"].replace("+00:00", ""), run["recipe_name"], run["seed"],
                         run["outcome"], _s(run["time_to_accuracy_s"]),
                         "-" if run["best_accuracy"] is None else f"{run['best_accuracy']:.2%}",
                         run.get("group_id") or "-", f"E{envs[key]}"])
    return ("<h2 id=environment>Environments</h2><p class=note>Every run records where it ran; identical "
            "environments are listed once.</p>"
            + _table(["env", *ENV_FIELDS, "runs"], env_rows, cls="envs")
            + "<h2 id=runs>Runs</h2><div class=scroll>"
            + _table(["run", "started (UTC)", "recipe", "seed", "outcome", "time-to-accuracy", "best accuracy",
                      "group", "env"], run_rows, cls="runs") + "</div>")


# ---------------------------------------------------------------- the command

def cmd_report(args: argparse.Namespace) -> int:

    from speedrun.paths import default_store

    if args.runs and args.group:
        raise ConfigError("give --runs or --group, not both")
    store = RunStore(args.store or default_store(), existing=True)  # reading never creates a store
    report = build_report(store, out=args.out, run_ids=args.runs, group=args.group, ablation=args.ablation,
                          price_per_hour=args.price_per_hour)
    new_console().print(
        f"wrote {report.path} ({report.runs} runs, {report.leaderboard_rows} leaderboard rows, "
        f"{len(report.plots)} plots{', ablation ' + report.ablation_id if report.ablation_id else ''}) "
        f"in {report.seconds:.1f} s", markup=False, highlight=False)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="write an HTML report: leaderboard, curves, ablation waterfall")
    p.add_argument("--out", default="speedrun-report", help="folder for index.html and its plots "
                                                            "(default ./speedrun-report)")
    p.add_argument("--runs", nargs="+", metavar="RUN_ID", help="only these runs (their curves are plotted)")
    p.add_argument("--group", help="only the runs of this group (a multi-seed train or an ablation)")
    p.add_argument("--ablation", metavar="ID", help="the ablation to draw (default: --group if it is one, "
                                                    "else the newest)")
    p.add_argument("--price-per-hour", type=float, metavar="USD", help="machine price, for the cost column")
    p.add_argument("--store", help="run store (SQLite file); default $SPEEDRUN_STORE or $SPEEDRUN_HOME/runs.sqlite")
    p.set_defaults(func=cmd_report)
    return p
