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
    return _png(curves_figure(runs, labels=labels))


def curves_figure(runs: Sequence[Mapping[str, Any]], *, labels: Sequence[str] | None = None) -> Figure:
    """The figure of :func:`curves_png`. The legend sits below the axes, outside them, so it never
    covers a point (inside, "lower right" hid the early points of slow runs)."""
    shown = [run for run in runs if run.get("curve")]
    rows = math.ceil(len(shown) / (2 if len(shown) > 6 else 1))
    legend_in = 0.16 * rows + 0.2 if shown else 0.0  # inches below the axes for the legend
    height = 4.5 + legend_in
    fig = Figure(figsize=(9, height), dpi=DPI)  # fixed margins: a layout engine costs more than the drawing
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.22 / height, bottom=(0.55 + legend_in) / height)
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
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, (legend_in + 0.05) / height),
                  bbox_transform=fig.transFigure, ncols=2 if len(shown) > 6 else 1, frameon=False)
    else:
        ax.text(0.5, 0.5, "no curves recorded", ha="center", transform=ax.transAxes)
    return fig


@dataclass(frozen=True)
class Step:
    label: str
    top: float  # seconds before the step
    bottom: float  # seconds after it
    bound: bool  # the value is a bound (a variant never reached the target)
    kind: str  # "start", "needed", "technique", "interactions", "end"
    note: str = ""  # drawn on a "needed" bar: the best accuracy without the technique


def waterfall_steps(result: AblationResult) -> list[Step]:
    """From the baseline's median time to the full recipe's: first the techniques without which the
    target is missed (``needed``: no factor, the time stays), then one step per technique (its
    measured factor, largest first), then whatever the factors do not explain (their interactions),
    only when that is more than noise: every factor an estimate and the product check's interval
    excluding 1 (:func:`rest_of_product` says why not otherwise)."""
    by_name = {v.name: v for v in result.variants}
    effects = _waterfall_effects(result)
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
    for e in effects:
        if e.needed:
            best = "-" if e.best_accuracy_without is None else f"{e.best_accuracy_without:.1%}"
            steps.append(Step(f"{e.technique}\nneeded", current, current, True, "needed",
                              f"without it never\nreached (best {best})"))
    for e in sorted(effects, key=lambda e: -(e.speedup.value or 0.0)):
        f = e.speedup.value
        if e.needed or not f or not math.isfinite(f):
            continue
        after = current / f
        mark = "" if e.speedup.kind == "estimate" else (">=" if e.speedup.kind == "lower_bound" else "<=")
        steps.append(Step(f"{e.technique}\n/{mark}{f:.2f}", current, after, e.speedup.kind != "estimate",
                          "technique"))
        current = after
    rest, why_not = rest_of_product(result)
    if rest is not None and abs(math.log(current / t_full)) > 1e-9:
        steps.append(Step(f"rest (interactions)\nx{t_full / current:.2f}", current, t_full, False, "interactions"))
    steps.append(Step("full recipe", t_full, 0.0, full_bound, "end"))
    return steps


def _waterfall_effects(result: AblationResult) -> list:
    return [e for e in result.attribution.effects if e.mode == "leave-one-out"] or \
           [e for e in result.attribution.effects if e.mode == "add-one-in"]


def rest_of_product(result: AblationResult) -> tuple[Any, str]:
    """What the drawn factors leave unexplained, ``(ratio, "")`` when worth a bar, else ``(None, why)``.

    The rest is the product check's ``product / total`` (its interval bootstrapped with the factors):
    drawn only when every factor and the total are estimates and the interval excludes 1. Otherwise
    it is a bound, or noise: with one seed per variant on a busy machine it ran to x507.
    """
    effects = _waterfall_effects(result)
    mode = effects[0].mode if effects else None
    check = next((p for p in result.attribution.products if p.mode == mode), None)
    if check is None:
        return None, ""
    if any(e.needed or e.harmful or e.speedup.kind != "estimate" for e in effects) or \
            check.product_over_total.kind != "estimate":
        return None, "the rest is not drawn: a factor or the total is a bound (a variant misses the target)"
    if not check.flagged:
        return None, (f"the rest, x{check.product_over_total}, is not drawn: its interval includes 1 (the factors "
                      "multiply to the measured total within noise)")
    return check.product_over_total, ""


def waterfall_png(result: AblationResult) -> bytes | None:
    """The waterfall on a log time axis; None when the ablation has no baseline or full time yet."""
    steps = waterfall_steps(result)
    if not steps:
        return None
    _, why_not = rest_of_product(result)
    width = max(6.0, 1.2 * len(steps) + 2)
    fig = Figure(figsize=(width, 5.0 + 0.25 * bool(why_not)), dpi=DPI)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, top=0.92, bottom=0.2 + 0.04 * bool(why_not))
    ax = fig.add_subplot()
    ax.set_yscale("log")
    floor = min(min(s.top for s in steps), min(s.bottom for s in steps if s.bottom > 0) if any(
        s.bottom > 0 for s in steps) else math.inf) / 1.5
    ceiling = max(s.top for s in steps) * 1.25  # needed techniques' arrows reach up here: no time without them
    for i, s in enumerate(steps):
        if s.kind == "needed":  # without it the time is unbounded: an arrow up off the scale, no bar
            ax.annotate("", (i, ceiling), xytext=(i, s.top),
                        arrowprops=dict(arrowstyle="-|>,head_width=0.6,head_length=0.8", color="#8172b2", lw=2.5))
            ax.annotate(s.note, (i, ceiling), ha="center", va="bottom", fontsize=7)
            if i + 1 < len(steps):
                ax.plot([i + 0.33, i + 0.67], [s.top, steps[i + 1].top], color="0.5", lw=0.7, ls=":")
            continue
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
    # Room for the labels above the bars (and above the needed techniques' notes).
    ax.set_ylim(floor, ceiling * (1.6 if any(s.kind == "needed" for s in steps) else 1.0))
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("median time-to-accuracy (s, log scale)")
    seeds = f"{len(result.seeds)} seed{'' if len(result.seeds) == 1 else 's'}"
    ax.set_title(f"{result.recipe_name}: baseline to full recipe ({result.mode}, {seeds})", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.25)
    if why_not:
        fig.text(0.5, 0.03, why_not, ha="center", va="bottom", fontsize=7, color="0.3")
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
