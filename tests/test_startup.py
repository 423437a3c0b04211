"""Start-up cost: commands that only read the store or list things must not import torch (~2 s).

Each check runs in a fresh interpreter, since this test process has torch loaded already.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter from the repository root; return its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_cli_does_not_import_torch():
    assert _run("import sys, speedrun.cli; print('torch' in sys.modules)").strip() == "False"


def test_store_and_listing_commands_do_not_import_torch(tmp_path):
    out = _run(f"""
        import contextlib, io, sys
        from speedrun.cli import main
        from speedrun.recipes import get_recipe
        from speedrun.store import RunStore

        store = {str(tmp_path / "runs.sqlite")!r}
        recipe = get_recipe("fashion-mnist")
        s = RunStore(store)
        s.start_run(run_id="r1", recipe_name=recipe.name, recipe=recipe.to_dict(), env={{}}, target=0.9, seed=0)
        s.finish_run("r1", outcome="reached", detail="test", summary={{"time_to_accuracy_s": 3.0, "epochs": 1.0}},
                     curve=[{{"elapsed_s": t, "epoch": t / 3, "step": t, "accuracy": 0.3 * t, "test_loss": 1.0,
                              "train_loss": 1.0}} for t in (1.0, 2.0, 3.0)])
        s.close()
        commands = [["runs", "--store", store], ["runs", "--json", "--store", store], ["show", "r1", "--store", store],
                    ["recipes"], ["recipes", "fashion-mnist"], ["techniques", "--json"],
                    ["report", "--out", {str(tmp_path / "report")!r}, "--store", store]]
        for argv in commands:
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv) == 0, argv
            print(argv[0], "torch" in sys.modules)
        """)
    lines = out.splitlines()
    assert len(lines) == 7 and all(line.endswith(" False") for line in lines), out


def test_image_folder_decoding_does_not_import_torch():
    """`speedrun data prepare` on an image folder needs numpy and Pillow only."""
    assert _run("import sys, speedrun.data.imagefolder; print('torch' in sys.modules)").strip() == "False"


def test_public_names_still_resolve_whatever_was_imported_first():
    """`speedrun.train` stays the function even when a submodule of the subpackage was imported first."""
    out = _run("""
        import speedrun.train.loop
        import speedrun
        from speedrun.data import DataError, ResidentLoader
        from speedrun.data.sources import DataError as SourcesDataError
        from speedrun.train import FitState
        from speedrun.train.run import TrainResult, train
        assert speedrun.train is train and speedrun.TrainResult is TrainResult, speedrun.train
        assert {"train", "TrainResult", "Recipe", "ConfigError"} <= set(dir(speedrun))
        assert SourcesDataError is DataError and ResidentLoader.__module__ == "speedrun.data.loader"
        try:
            speedrun.data.no_such_name
        except AttributeError as e:
            print(e)
        """)
    assert "no_such_name" in out
