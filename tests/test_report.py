"""``speedrun report``: the HTML page, its plots, and the page as headless Chromium renders it."""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from speedrun.ablate import make_plan, plan_key, plan_variants
from speedrun.recipes import get_recipe
from speedrun.report import add_parser, build_report
from speedrun.store import RunStore

CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = {"device_name": "AMD EPYC 7B13 (2 cores)", "cpu_model": "AMD EPYC 7B13", "threads": 2, "precision": "fp32",
       "torch_version": "2.13.0+cpu", "code_version": "0.1.0+gtest", "python": "3.11"}
GPU = {**CPU, "device_name": "NVIDIA H100 80GB HBM3", "threads": 16, "precision": "bf16",
       "torch_version": "2.13.0+cu128"}


def _run(store: RunStore, run_id: str, recipe, env: dict, seed: int, tta: float | None, *, group=None) -> None:
    ran = tta if tta is not None else 90.0
    curve = [{"elapsed_s": ran * k / 4, "epoch": k / 2, "step": 10 * k, "accuracy": (0.5 + 0.1 * k) if tta else
              0.4 + 0.05 * k, "test_loss": 1 / k, "train_loss": 1 / k} for k in range(1, 5)]
    store.start_run(run_id=run_id, recipe_name=recipe.name, recipe=recipe.to_dict(), env=env, target=recipe.target,
                    seed=seed, group_id=group)
    store.finish_run(run_id, outcome="reached" if tta else "budget_exhausted", detail="test",
                     summary={"time_to_accuracy_s": tta, "best_accuracy": curve[-1]["accuracy"], "total_time_s": ran,
                              "epochs": 2.0}, curve=curve)


@pytest.fixture
def store(tmp_path) -> RunStore:
    """An ablation of two techniques over 3 seeds (the baseline never reaches), plus GPU runs."""
    store = RunStore(tmp_path / "runs.sqlite")
    recipe = get_recipe("fashion-mnist").override({"target": 0.9})
    variants = plan_variants(recipe, techniques=["flip", "label-smoothing"])
    plan = make_plan(recipe, variants, techniques=["flip", "label-smoothing"], mode="leave-one-out",
                     seeds=[0, 1, 2])
    store.start_ablation(ablation_id="abl0000001", recipe_name=recipe.name, plan=plan, plan_key=plan_key(plan))
    times = {"full": 20.0, "baseline": None, "-flip": 30.0, "-label-smoothing": 25.0}
    for seed in range(3):
        for v in variants:
            run_id = f"c{v.name.strip('-')[:4]}{seed}"
            tta = None if times[v.name] is None else times[v.name] * (1 + 0.02 * seed)
            _run(store, run_id, v.recipe, CPU, seed, tta, group="abl0000001")
            store.link_ablation_run("abl0000001", run_id=run_id, variant=v.name, seed=seed, role="measure",
                                    epochs=v.recipe.train.epochs)
            if seed == 0 and v.name == "full":
                store.set_metric(run_id, "inference_latency_s", 0.00042)
    for seed in range(2):
        _run(store, f"gpu{seed}", recipe, GPU, seed, 4.0 + seed)
    store.start_run(run_id="live1", recipe_name=recipe.name, recipe=recipe.to_dict(), env=CPU, target=0.9, seed=7)
    return store


def test_report_page_has_leaderboard_plots_ablation_and_environments(store, tmp_path):
    report = build_report(store, out=tmp_path / "out", price_per_hour=3.6)
    page = report.path.read_text()
    assert report.path == tmp_path / "out" / "index.html" and report.ablation_id == "abl0000001"
    assert [p.name for p in report.plots] == ["curves.png", "waterfall.png"]
    for p in report.plots:
        assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 5000
    assert page.count('src="data:image/png;base64,') == 2 and "<script src" not in page and "<link rel=stylesheet" not in page
    board = re.search(r'<table class="leaderboard">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><td>", board)
    assert len(rows) == report.leaderboard_rows == 5  # 4 CPU variants + the full recipe on the GPU
    first = re.findall(r"<tr><td>(.*?)</tr>", board)[0]
    assert "NVIDIA H100" in first and "4.5 s" in first and "$0.0045" in first  # 4.5 s at $3.6/h
    assert "0.42 ms" in board and "not measured" in board  # measured once, never invented elsewhere
    assert "not reached" in board  # the baseline keeps its row
    assert "never reached (best" in page and "speedup [95% CI]" in page and "&gt;= " in page
    envs = re.search(r'<table class="envs">(.*?)</table>', page, re.S).group(1)
    assert envs.count("<tr><td>E") == 2 and "2.13.0+cu128" in envs
    for run_id in ("cfull0", "cbase2", "gpu1", "live1"):
        assert f"<td>{run_id}</td>" in page


def test_report_of_chosen_runs_and_of_an_empty_store(store, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="speedrun")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "--out", str(tmp_path / "chosen"), "--runs", "gpu0", "gpu1",
                              "--store", str(store.path)])
    assert args.func(args) == 0 and "wrote" in capsys.readouterr().out
    page = (tmp_path / "chosen" / "index.html").read_text()
    assert "2 runs from" in page and "give --price-per-hour" in page
    empty = RunStore(tmp_path / "empty.sqlite")
    report = build_report(empty, out=tmp_path / "empty")
    page = report.path.read_text()
    assert report.plots == () and "no runs to plot" in page and "no ablation in the store" in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                  "(apt-get install chromium) to render the page")
def test_report_renders_in_headless_chromium(store, tmp_path):
    from PIL import Image

    report = build_report(store, out=tmp_path / "out", price_per_hour=3.6)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1200,2000", "--dump-dom",
         report.path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'data-plots="2/2"' in dom  # both plots decoded (set by the page's load handler)
    board = re.search(r'<table class="leaderboard">(.*?)</table>', dom, re.S).group(1)
    assert len(re.findall(r"<tr><td>", board)) == 5
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # the page logs nothing, so any console line is an error
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2000)
    low, high = image.getextrema()
    assert high - low > 100 and len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 16  # not blank


def test_the_legend_covers_no_point(store):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from speedrun.report.plots import curves_figure

    runs = store.list_runs(limit=None)[:8]  # early and late, high and low points: every corner is used
    fig = curves_figure(runs)
    FigureCanvasAgg(fig).draw()
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent()
    axes = ax.get_window_extent()
    assert legend.y1 < axes.y0  # below the axes, clear of every point and of the x-axis label
    assert legend.y1 < ax.xaxis.label.get_window_extent().y0 and legend.y0 >= 0
    points = [ax.transData.transform((p["elapsed_s"], p["accuracy"])) for r in runs for p in r["curve"]]
    assert points and not any(legend.contains(x, y) for x, y in points)


def test_chosen_runs_bring_only_their_own_ablation_and_an_empty_board_says_so(store, tmp_path):
    report = build_report(store, out=tmp_path / "gpu", run_ids=["gpu0", "gpu1"])
    assert report.ablation_id is None and "no ablation" in report.path.read_text()
    report = build_report(store, out=tmp_path / "abl", run_ids=["cfull0", "gpu0"])
    assert report.ablation_id == "abl0000001"
    page = build_report(RunStore(tmp_path / "empty.sqlite"), out=tmp_path / "empty").path.read_text()
    assert "no finished runs to rank" in page


def test_the_leaderboard_ranks_like_with_like(store, tmp_path):
    from speedrun.report import leaderboard

    other = get_recipe("cifar10-cpu")
    _run(store, "cifar0", other, CPU, 0, 1.0)  # fastest of all, but on another dataset and target
    board = leaderboard(store.list_runs(limit=None), {}, price_per_hour=None)
    assert [(row["dataset"], row["rank"]) for row in board][:2] == [("fashion-mnist", 1), ("fashion-mnist", 2)]
    assert board[-1]["dataset"] == "cifar10" and board[-1]["rank"] == 1
    assert {row["recipe"] for row in board} >= {"fashion-mnist[baseline]", "cifar10-cpu"}
