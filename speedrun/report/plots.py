"""The report's plots, drawn with matplotlib's Agg canvas (no display, no pyplot state) into PNG bytes."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from speedrun.ablate import AblationResult

DPI = 100


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def curves_png(runs: Sequence[Mapping[str, Any]], *, labels: Sequence[str] | None = None) -> bytes:
    """Held-out accuracy against clock time, one line per run; the target as a dashed line, the
    moment it was reached as a dot."""
    fig = Figure(figsize=(9, 4.5), dpi=DPI)  # fixed margins: a layout engine costs more than the drawing
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.12)
    ax = fig.add_subplot()
    targets = set()
    for i, run in enumerate(runs):
        curve = run.get("curve") or []
        if not curve:
            continue
        device = str((run.get("env") or {}).get("device_name") or run.get("device") or "")
        label = labels[i] if labels else f"{run['id']} {run['recipe_name']} s{run['seed']} ({device[:18]})"
        line, = ax.plot([p["elapsed_s"] for p in curve], [p["accuracy"] for p in curve], marker=".", lw=1.2,
                        label=label)
        if run.get("time_to_accuracy_s") is not None:
            ax.plot([run["time_to_accuracy_s"]], [curve[-1]["accuracy"]], "o", color=line.get_color(), ms=7)
        if run.get("target"):
            targets.add(run["target"])
    for t in sorted(targets):
        ax.axhline(t, color="0.4", ls="--", lw=0.8)
        ax.annotate(f"target {t:.1%}", (0.01, t), xycoords=("axes fraction", "data"), ha="left", va="bottom",
                    fontsize=8, color="0.3")
    ax.set_xlabel("clock time (s)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="lower right", ncols=2 if len(runs) > 6 else 1)
    else:
        ax.text(0.5, 0.5, "no curves recorded", ha="center", transform=ax.transAxes)
    return _png(fig)


@dataclass(frozen=True)
class Step:
    label: str
    top: float  # seconds before the step
    bottom: float  # seconds after it
    bound: bool  # the value is a bound (a variant never reached the target)
    kind: str  # "start", "technique", "interactions", "end"


def waterfall_steps(result: AblationResult) -> list[Step]:
    """From the baseline's median time to the full recipe's: one step per technique (its measured
    factor, largest first), then whatever the factors do not explain (their interactions)."""
    by_name = {v.name: v for v in result.variants}
    effects = [e for e in result.attribution.effects if e.mode == "leave-one-out"] or \
              [e for e in result.attribution.effects if e.mode == "add-one-in"]
    full = by_name.get("full")
    baseline = by_name.get("baseline")

    def time_of(v) -> tuple[float | None, bool]:
        if v is None or not v.runs:
            return None, False
        if v.median_s is not None:
            return v.median_s, False
        ran = sorted(r.ran_s for r in v.runs)
        return (ran[len(ran) // 2] if ran else None), True  # never reached: at least this long

    t_base, base_bound = time_of(baseline)
    t_full, full_bound = time_of(full)
    if not t_base or not t_full:
        return []
    steps = [Step("baseline", t_base, 0.0, base_bound, "start")]
    current = t_base
    for e in sorted(effects, key=lambda e: -(e.speedup.value or 0.0)):
        f = e.speedup.value
        if not f or not math.isfinite(f):
            continue
        after = current / f
        mark = "" if e.speedup.kind == "estimate" else (">=" if e.speedup.kind == "lower_bound" else "<=")
        steps.append(Step(f"{e.technique}\n/{mark}{f:.2f}", current, after, e.speedup.kind != "estimate",
                          "technique"))
        current = after
    if abs(math.log(current / t_full)) > 1e-9:
        steps.append(Step(f"rest (interactions)\nx{t_full / current:.2f}", current, t_full,
                          base_bound or full_bound, "interactions"))
    steps.append(Step("full recipe", t_full, 0.0, full_bound, "end"))
    return steps


def waterfall_png(result: AblationResult) -> bytes | None:
    """The waterfall on a log time axis; None when the ablation has no baseline or full time yet."""
    steps = waterfall_steps(result)
    if not steps:
        return None
    width = max(6.0, 1.2 * len(steps) + 2)
    fig = Figure(figsize=(width, 5.0), dpi=DPI)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, top=0.92, bottom=0.2)
    ax = fig.add_subplot()
    ax.set_yscale("log")
    floor = min(min(s.top for s in steps), min(s.bottom for s in steps if s.bottom > 0) if any(
        s.bottom > 0 for s in steps) else math.inf) / 1.5
    for i, s in enumerate(steps):
        if s.kind in ("start", "end"):
            low, high, color = floor, s.top, "#4c72b0"
        else:
            low, high = sorted((s.top, s.bottom))
            color = "#55a868" if s.bottom < s.top else "#c44e52"
        ax.bar(i, high - low, bottom=low, color=color, edgecolor="black", lw=0.6, width=0.65,
               hatch="//" if s.bound else None)
        value = s.top if s.kind in ("start", "end") else s.bottom
        ax.annotate(("at least " if s.bound and s.kind in ("start", "end") else "") + f"{value:.3g} s",
                    (i, high), ha="center", va="bottom", fontsize=8)
        if i + 1 < len(steps):
            nxt = steps[i + 1].top
            ax.plot([i + 0.33, i + 0.67], [value if s.kind != "start" else s.top, nxt], color="0.5", lw=0.7, ls=":")
    ax.set_xticks(range(len(steps)), [s.label for s in steps], fontsize=8)
    ax.set_ylim(floor, max(s.top for s in steps) * 1.25)  # room for the labels above the bars
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("median time-to-accuracy (s, log scale)")
    ax.set_title(f"{result.recipe_name}: baseline to full recipe ({result.mode}, {len(result.seeds)} seeds)",
                 fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.25)
    return _png(fig)


def study_png(trials: Sequence[Mapping[str, Any]], *, title: str = "") -> bytes:
    """A tuning study's search: each trial's validation time-to-target against when it started (minutes
    into the study), the best so far as a step line, trials that missed or were pruned marked on top."""
    from datetime import datetime

    fig = Figure(figsize=(9, 4), dpi=DPI)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.13)
    ax = fig.add_subplot()
    starts = [datetime.fromisoformat(t["created_at"]).timestamp() for t in trials]
    t0 = min(starts, default=0.0)
    hits = [((s - t0) / 60, t["time_to_accuracy_s"]) for s, t in zip(starts, trials) if t["outcome"] == "reached"]
    top = max((h for _, h in hits), default=1.0) * 1.15
    others = [((s - t0) / 60, t["outcome"]) for s, t in zip(starts, trials) if t["outcome"] != "reached"]
    if hits:
        ax.plot(*zip(*hits), "o", ms=5, label="reached (time-to-target on val)")
        best, xs, ys = math.inf, [], []
        for x, y in sorted(hits):
            best = min(best, y)
            xs.append(x)
            ys.append(best)
        ax.step(xs, ys, where="post", lw=1.5, label="best so far")
    for outcome, marker in (("pruned", "x"), ("budget_exhausted", "v"), ("diverged", "^"), ("failed", "s"),
                            ("lost", "d")):
        xs = [x for x, o in others if o == outcome]
        if xs:
            ax.plot(xs, [top] * len(xs), marker, ls="none", label=outcome.replace("_", " "))
    ax.set_xlabel("minutes into the study (trial start)")
    ax.set_ylabel("seconds to target")
    ax.set_ylim(0, top * 1.08)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)
