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


# ---------------------------------------------------------------- recipes that are not TOML text

def test_a_recipe_that_is_not_utf8_or_is_a_folder_is_one_line(tmp_path, capsys):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[train]\nepochs = 3 # caf\xe9\n')
    assert main(["train", "--recipe", str(latin)]) == 2
    assert f"{latin}: not UTF-8 text (byte 0xe9 at offset 24); save the recipe as UTF-8" in one_error_line(capsys)
    (tmp_path / "x.toml").mkdir()
    assert main(["train", "--recipe", str(tmp_path / "x.toml")]) == 2
    assert "is a folder, not a TOML file" in one_error_line(capsys)
