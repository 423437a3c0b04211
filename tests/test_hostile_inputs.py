"""Inputs a hostile new user tries (issue 18): each ends in a one-line error or a correct recorded
outcome, never a traceback or a wrong result."""
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

from speedrun.cli import main
from speedrun.data import download, imagefolder
from speedrun.data.cli import main as data_main
from speedrun.data.sources import FASHION_MNIST_CLASSES, DataError, IdxSource, prepare, read_meta, resolve
from speedrun.store import RunStore, StoreError
from speedrun.train.hooks import TimeBudget
from speedrun.train.loop import StopFit
from tests.conftest import TINY, make_tar, synthetic_images, write_idx_dataset, write_tree

SETS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
REPO = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    """The command's stderr, which must be a single `speedrun: error:` line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("speedrun: error: "), err
    return err


def namespace_works() -> bool:
    """Whether this machine lets us mount in a user namespace (a read-only bind, a tiny tmpfs) unprivileged."""
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {folder}"],
                              capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not namespace_works(), reason="no user namespaces to mount a test file system in")


def python_in_namespace(mounts: str, code: str, home: Path) -> subprocess.CompletedProcess:
    """Run Python ``code`` after the shell commands ``mounts``, in a private mount namespace."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f'{mounts} && exec "$0" -c "$1"', sys.executable, code],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "SPEEDRUN_HOME": str(home)})


# ---------------------------------------------------------------- names that are not UTF-8

def windows_tree(root: Path) -> Path:
    """An image tree as a Windows archive leaves it: a class folder and a file named in Latin-1."""
    write_tree(root, {"train": {"cat": 4, "dog": 4}}, size=8)
    os.rename(root / "train" / "cat", os.fsdecode(bytes(root / "train") + b"/caf\xe9"))  # 'café' in Latin-1
    os.rename(root / "train" / "dog" / "000.png", os.fsdecode(bytes(root / "train" / "dog") + b"/\xff.png"))
    return root


def test_names_that_are_not_utf8_are_kept_and_shown_escaped(tmp_path, isolated_home):
    root = windows_tree(tmp_path / "win")
    proc = subprocess.run([sys.executable, "-m", "speedrun", "data", "prepare", str(root)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "SPEEDRUN_HOME": str(isolated_home)})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "classes      2: caf\\xe9, dog" in proc.stdout and "train        6 images" in proc.stdout
    assert "class folder name not UTF-8, named with \\x escapes: caf\\xe9" in proc.stderr
    meta = read_meta(prepare(resolve(str(root))).directory)
    assert meta["classes"] == ["caf\\xe9", "dog"] and meta["counts"]["train"] == [3, 3]  # nothing skipped

    archive = make_tar(root, tmp_path / "win.tar.gz")  # the archive itself, extracted by speedrun
    assert read_meta(prepare(resolve(str(archive))).directory)["classes"] == ["caf\\xe9", "dog"]


def test_training_on_names_that_are_not_utf8(tmp_path, capsys):
    root = windows_tree(tmp_path / "win")
    code = main(["train", "--data", str(root), *SETS, "--set", "train.batch_size=2", "--set", "train.epochs=1",
                 "--json"])
    assert code in (0, 1) and json.loads(capsys.readouterr().out)["outcome"] in ("reached", "completed", "budget_exhausted")


# ---------------------------------------------------------------- a single class

def test_a_single_class_is_refused(tmp_path, capsys):
    x, _ = synthetic_images(64)
    one = write_idx_dataset(tmp_path / "one", x, np.zeros(64, np.uint8), x[:16], np.zeros(16, np.uint8))
    assert main(["train", "--data", str(one), *SETS]) == 2
    assert "only class '0' in the training split; classification needs at least 2 classes" in one_error_line(capsys)

    tree = write_tree(tmp_path / "tree", {"train": {"cat": 3}, "val": {"cat": 1}}, size=8)
    assert data_main(["data", "prepare", str(tree)]) == 2
    err = capsys.readouterr().err
    assert "only class 'cat' in the training split" in err and "Traceback" not in err
    assert not list((Path(os.environ["SPEEDRUN_HOME"]) / "cache").glob("tree-*"))  # nothing cached


def test_a_cache_of_one_class_made_before_the_check_is_refused(tmp_path):
    x, y = synthetic_images(64)
    directory = prepare(resolve(str(write_idx_dataset(tmp_path / "d", x, y, x[:16], y[:16])))).directory
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, "classes": ["only"]}))
    with pytest.raises(DataError, match="only class 'only'"):
        prepare(resolve(str(tmp_path / "d")))


# ---------------------------------------------------------------- IDX labels out of range

def test_an_idx_label_out_of_range_is_refused(tmp_path, capsys):
    x, y = synthetic_images(64, classes=4)
    y[10] = 250
    stray = write_idx_dataset(tmp_path / "stray", x, y, x[:16], y[:16] % 4)
    assert main(["train", "--data", str(stray), *SETS]) == 2
    err = one_error_line(capsys)
    assert "train-labels-idx1-ubyte.gz: labels run to 250, but 246 of the classes 0..250 have no training image" in err
    assert "(is label 250 out of range?)" in err

    y[10] = 3
    test_y = y[:16].copy()
    test_y[0] = 9  # a class the training split never shows
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: labels run to 9, but 6 of the classes"):
        IdxSource(write_idx_dataset(tmp_path / "t", x, y, x[:16], test_y)).read()
    named = write_idx_dataset(tmp_path / "named", x, np.where(y == 3, 10, y).astype(np.uint8), x[:16], y[:16])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: labels outside 0..9 \(found 10\)"):
        IdxSource(named, "fmnist", FASHION_MNIST_CLASSES).read()


# ---------------------------------------------------------------- recipes that are not TOML text

def test_a_recipe_that_is_not_utf8_or_is_a_folder_is_one_line(tmp_path, capsys):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[train]\nepochs = 3 # caf\xe9\n')
    assert main(["train", "--recipe", str(latin)]) == 2
    assert f"{latin}: not UTF-8 text (byte 0xe9 at offset 24); save the recipe as UTF-8" in one_error_line(capsys)
    (tmp_path / "x.toml").mkdir()
    assert main(["train", "--recipe", str(tmp_path / "x.toml")]) == 2
    assert "is a folder, not a TOML file" in one_error_line(capsys)


# ---------------------------------------------------------------- symlinked class folders

def test_a_class_folder_linked_back_into_the_tree_is_refused(tmp_path):
    root = write_tree(tmp_path / "t", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}}, size=8)
    (root / "train" / "kitty").symlink_to("cat")
    with pytest.raises(DataError) as e:
        imagefolder.scan(root)
    assert str(e.value) == (f"{root}: class folder train/kitty is a link to {root / 'train' / 'cat'}, the same "
                            "folder as train/cat: it would be a duplicate class; remove the link, or copy the images")
    (root / "train" / "kitty").unlink()

    (root / "train" / "all").symlink_to(root)  # a folder holding the whole tree
    with pytest.raises(DataError, match="class folder train/all is a link to .*, a folder holding train: it would"):
        imagefolder.scan(root)
    (root / "train" / "all").unlink()

    shutil.rmtree(root / "val" / "dog")
    (root / "val" / "dog").symlink_to(root / "train" / "dog")  # a test set of training images
    with pytest.raises(DataError, match="class folder val/dog is a link to .*, the same folder as train/dog"):
        imagefolder.scan(root)


def test_class_folders_linked_from_elsewhere_are_fine(tmp_path):
    elsewhere = write_tree(tmp_path / "store", {"train": {"bird": 2}}, size=8)
    root = write_tree(tmp_path / "t", {"train": {"cat": 2}, "val": {"cat": 1}}, size=8)
    (root / "train" / "bird").symlink_to(elsewhere / "train" / "bird")
    listing = imagefolder.scan(root)
    assert listing.classes == ("bird", "cat") and len(listing.train) == 4


# ---------------------------------------------------------------- damaged run stores

def damaged_store(path: Path) -> Path:
    """A store whose header and schema page are intact and whose other pages are garbage."""
    store = RunStore(path)
    for i in range(30):
        store.start_run(run_id=f"run{i:02d}", recipe_name="r", recipe={"pad": "x" * 500}, env={}, target=0.9,
                        seed=i)
    store.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(np.random.default_rng(0).integers(0, 256, size - 4096, dtype=np.uint8).tobytes())
    return path


def test_runs_and_show_on_a_damaged_store_are_one_line(tmp_path, capsys):
    path = damaged_store(tmp_path / "runs.sqlite")
    for argv in (["runs"], ["show", "run01"], ["compare"], ["report", "--out", str(tmp_path / "r")]):
        assert main([*argv, "--store", str(path)]) == 2, argv
        err = one_error_line(capsys)
        assert "database disk image is malformed" in err and "the file is damaged: move it aside" in err


def test_train_on_a_damaged_store_trains_every_seed_and_says_none_was_recorded(tmp_path, capsys, synthetic_dir):
    path = damaged_store(tmp_path / "runs.sqlite")
    code = main(["train", "--data", str(synthetic_dir), "--target", "0.6", *SETS, "--seeds", "2", "--store",
                 str(path), "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert code == 0 and [r["seed"] for r in result["runs"]] == [0, 1] and result["pass_rate"] == 1.0
    assert "training anyway, the run will not be recorded" in captured.err
    assert "2 of 2 run(s) not recorded in the run store" in captured.err and "Traceback" not in captured.err


# ---------------------------------------------------------------- reading commands never create or write a store

def test_reading_commands_do_not_create_a_mistyped_store(tmp_path, capsys):
    typo = tmp_path / "rnus.sqlite"
    for argv in (["runs"], ["show", "abc"], ["compare"], ["report", "--out", str(tmp_path / "r")]):
        assert main([*argv, "--store", str(typo)]) == 2, argv
        assert f"no run store at {typo}: it does not exist" in one_error_line(capsys)
    assert not typo.exists()
    assert main(["runs", "--store", str(tmp_path)]) == 2 and "it is not a file" in one_error_line(capsys)


def stored_run(path: Path) -> Path:
    store = RunStore(path)
    store.start_run(run_id="abc123", recipe_name="r", recipe={}, env={"device_name": "cpu"}, target=0.9, seed=0)
    store.finish_run("abc123", outcome="reached", detail="ok", summary={"time_to_accuracy_s": 1.0}, curve=[])
    store.close()
    return path


@needs_namespace
def test_runs_lists_a_store_on_a_read_only_file_system(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    before = stored_run(folder / "runs.sqlite").read_bytes()
    proc = python_in_namespace(f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}",
                               f"from speedrun.cli import main; main(['runs', '--json', '--store', "
                               f"'{folder / 'runs.sqlite'}'])", tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)] == ["abc123"]
    assert (folder / "runs.sqlite").read_bytes() == before and os.listdir(folder) == ["runs.sqlite"]


def test_a_store_that_cannot_be_written_is_read_without_writing(tmp_path, monkeypatch):
    """The read-only path as it runs where the file system refuses writes (simulated: root may write anywhere)."""
    from speedrun import store as store_module

    path = stored_run(tmp_path / "runs.sqlite")
    before = path.read_bytes()
    monkeypatch.setattr(store_module, "_writable", lambda p: False)
    reader = RunStore(path, existing=True)
    assert [r["id"] for r in reader.list_runs()] == ["abc123"] and reader.get_run("abc")["outcome"] == "reached"
    with pytest.raises(StoreError, match="cannot write to the run store"):
        reader.start_run(run_id="new", recipe_name="r", recipe={}, env={}, target=0.9, seed=0)
    reader.close()
    assert path.read_bytes() == before


# ---------------------------------------------------------------- a store that fills up during a run

def test_a_run_whose_result_cannot_be_stored_is_not_listed_as_killed(tmp_path, capsys, synthetic_dir, monkeypatch):
    real_write_many = RunStore._write_many

    def full_for_the_curve(self, statements):
        if any("curve_json" in sql for sql, _ in statements):  # the final write, with the whole curve
            raise StoreError(f"cannot write to the run store at {self.path}: database or disk is full")
        return real_write_many(self, statements)

    monkeypatch.setattr(RunStore, "_write_many", full_for_the_curve)
    path = tmp_path / "runs.sqlite"
    code = main(["train", "--data", str(synthetic_dir), "--target", "0.6", *SETS, "--store", str(path)])
    assert code == 0 and "database or disk is full" in capsys.readouterr().err
    [run] = RunStore(path).list_runs()
    assert run["outcome"] == "failed" and run["detail"].startswith("ended reached (")
    assert "but its result could not be recorded: cannot write to the run store" in run["detail"]


def test_a_run_left_running_reads_as_lost_without_a_guessed_cause(tmp_path):
    from tests.test_store import _dead_pid

    store = RunStore(tmp_path / "runs.sqlite")
    store.start_run(run_id="r1", recipe_name="r", recipe={}, env={}, target=0.9, seed=0)
    with store._db:
        store._db.execute("UPDATE runs SET pid = ? WHERE id = 'r1'", (_dead_pid(),))
    detail = store.get_run("r1")["detail"]
    assert "ended without recording an outcome (killed outright, or the store could not be written)" in detail
    assert "SIGKILL" not in detail and "out of memory" not in detail


# ---------------------------------------------------------------- a full disk while preparing

def cache_leftovers(home: Path) -> list[str]:
    cache = home / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_a_disk_full_while_writing_the_cache_is_one_line_and_leaves_nothing(synthetic_dir, isolated_home,
                                                                             monkeypatch, capsys):
    real_save = np.save

    def save_then_fill(path, array, *args, **kwargs):
        real_save(path, array[: len(array) // 2], *args, **kwargs)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", save_then_fill)
    assert data_main(["data", "prepare", str(synthetic_dir)]) == 2
    err = capsys.readouterr().err
    assert f"no space left in {isolated_home / 'cache'} for the dataset cache: it needs about 990.0 KiB" in err
    assert "set SPEEDRUN_HOME to a folder on a larger disk" in err and len(err.strip().splitlines()) == 1
    assert cache_leftovers(isolated_home) == []


def test_an_image_tree_too_large_for_the_disk_is_refused_before_decoding(tmp_path, isolated_home, monkeypatch):
    root = write_tree(tmp_path / "t", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}}, size=8)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=100))
    decoded = []
    monkeypatch.setattr(imagefolder, "_decode_chunk", lambda task: decoded.append(task))
    with pytest.raises(DataError, match=r"no space left in .*/cache for the dataset cache: it needs about 1.6 KiB, "
                                        r"and 100 B are free"):
        prepare(resolve(str(root)))
    assert not decoded and cache_leftovers(isolated_home) == []


def test_a_disk_filling_during_decoding_is_refused_without_a_crash(tmp_path, isolated_home, monkeypatch):
    """The arrays are written through memory maps: on a full disk a sparse file would kill the process
    (SIGBUS). Their blocks are reserved first, so the full disk is an error there."""
    root = write_tree(tmp_path / "t", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}}, size=8)
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DataError, match="no space left in .*/cache for the dataset cache: it needs about"):
        prepare(resolve(str(root)))
    assert cache_leftovers(isolated_home) == []


def test_a_disk_full_while_extracting_an_archive_names_the_space_needed(tmp_path, isolated_home, monkeypatch):
    archive = make_tar(write_tree(tmp_path / "t", {"train": {"a": 3, "b": 3}}, size=8), tmp_path / "t.tar")

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download.shutil, "copyfileobj", full)
    assert download.unpacked_size(archive) == sum(f.stat().st_size for f in (tmp_path / "t").rglob("*.png"))
    with pytest.raises(DataError, match=r"no space left in .*/cache/extracted for the files of t.tar: it needs about "
                                        r"\d[.\d]* KiB"):
        prepare(resolve(str(archive)))
    assert os.listdir(isolated_home / "cache" / "extracted") == []


# Preparing on a tmpfs too small for the cache, with the check of free space before writing switched
# off: what remains is the file system's own ENOSPC, from np.save or from reserving a memory-mapped file.
PREPARE_WITHOUT_SPACE_CHECK = """
import sys
from speedrun.data import imagefolder, sources
from speedrun.data.cli import main
sources.check_space = imagefolder.check_space = lambda *args, **kwargs: None
sys.exit(main(["data", "prepare", sys.argv[1]]))
"""


@needs_namespace
@pytest.mark.parametrize("kind", ["idx", "tree"])
def test_a_really_full_disk_while_preparing(tmp_path, synthetic_dir, kind):
    """End to end on a 128 KiB tmpfs, with memory-mapped writes for the tree: no SIGBUS, no traceback."""
    home = tmp_path / "home"
    home.mkdir()
    data = synthetic_dir if kind == "idx" else write_tree(
        tmp_path / "tree", {"train": {"a": 40, "b": 40}, "val": {"a": 10, "b": 10}}, size=32)
    code = PREPARE_WITHOUT_SPACE_CHECK.replace("sys.argv[1]", repr(str(data)))
    proc = python_in_namespace(f"mount -t tmpfs -o size=128k none {home}", code, home)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"speedrun: error: no space left in {home / 'cache'} for the dataset cache: it needs about" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("speedrun: error:")
    checked = code.replace("sources.check_space = imagefolder.check_space = lambda *args, **kwargs: None", "")
    proc = python_in_namespace(f"mount -t tmpfs -o size=128k none {home}", checked, home)  # refused before writing
    assert proc.returncode == 2 and "it needs about" in proc.stderr and "are free" in proc.stderr


# ---------------------------------------------------------------- time budgets and long steps

class FakeClock:
    """A clock read by the budget hook, advanced by the test: no wall-clock time involved."""

    def __init__(self) -> None:
        self.now, self.eval_s = 0.0, 0.0

    def elapsed(self, *, sync: bool = True) -> float:
        return self.now


def steps_until_stop(budget: float, step_times: list[float], eval_s: float = 0.0):
    """Drive the budget hook as the loop does: before each batch, the step, then (optionally) an evaluation."""
    clock, state = FakeClock(), types.SimpleNamespace(epoch_float=0.0)
    hook = TimeBudget(budget, clock)
    done = 0
    for seconds in step_times:
        try:
            hook.before_batch(state)
        except StopFit as stop:
            return done, clock.now, stop.detail
        clock.now += seconds
        done += 1
        clock.now += eval_s
        clock.eval_s += eval_s
    return done, clock.now, None


def test_a_time_budget_stops_before_a_step_that_would_overrun_it():
    steps, end, detail = steps_until_stop(20, [19.5] * 5)  # the case: the 2nd step ended at 43 s
    assert steps == 1 and end <= 20
    assert detail == "time budget of 20 s used up at epoch 0.00 (19.5 s; the next step, ~19.5 s, would overrun it)"
    assert steps_until_stop(20, [1.0] * 30)[:2] == (20, 20.0)
    assert steps_until_stop(20, [6.0] + [1.0] * 30)[:2] == (15, 20.0)  # a slow warm-up step is soon forgotten
    assert steps_until_stop(0.001, [1.0] * 3)[:2] == (1, 1.0)  # the first step always runs


def test_evaluations_are_not_taken_for_slow_steps():
    steps, end, detail = steps_until_stop(22, [1.0] * 30, eval_s=3.0)  # counted as 4 s steps, it would stop at 20 s
    assert steps == 6 and end == 24.0
    assert detail == "time budget of 22 s exceeded: 24.0 s at epoch 0.00 (the last step took 1 s and an evaluation 3 s)"


def test_a_budget_overrun_by_a_slow_step_is_said():
    steps, end, detail = steps_until_stop(20, [5, 5, 30, 1])
    assert steps == 3 and end == 40
    assert detail == "time budget of 20 s exceeded: 40.0 s at epoch 0.00 (the last step took 30 s)"


# ---------------------------------------------------------------- store problems keep the run's exit code

def test_a_store_problem_keeps_the_exit_code_of_an_interrupted_run(capsys, unlearnable_dir, tmp_path, monkeypatch):
    from speedrun.train import hooks

    def interrupt(self, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(hooks.Evaluator, "run", interrupt)
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["train", "--data", str(unlearnable_dir), "--target", "0.9", *SETS, "--store",
                 str(blocker / "runs.sqlite")])
    captured = capsys.readouterr()
    assert code == 130 and "interrupted" in captured.out
    assert "1 of 1 run(s) not recorded in the run store: cannot open the run store" in captured.err
