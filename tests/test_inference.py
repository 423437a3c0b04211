"""Keeping and using a trained model: the result's predict, --save, speedrun.load, predict / evaluate /
export commands, and the files they refuse."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import speedrun
from speedrun.cli import main
from speedrun.config import ConfigError
from tests.conftest import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of the default recipe (flip-TTA on), saved; shared by the tests below."""
    from tests.conftest import synthetic_images, write_idx_dataset

    root = tmp_path_factory.mktemp("inference")
    data = write_idx_dataset(root / "synthetic", *synthetic_images(1024, seed=0), *synthetic_images(256, seed=1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDRUN_HOME", str(root / "home"))
        result = speedrun.train(data=data, store=None, stop_at_target=False, overrides=TINY)
        path = result.save(root / "model.pt")
        test_x, test_y = synthetic_images(256, seed=1)
    return result, path, data, root, test_x, test_y


def test_predict_gives_what_the_evaluation_gave(trained):
    result, _, _, _, test_x, test_y = trained
    assert result.recipe.eval.tta_flip and not result.model.training
    probabilities = result.predict(test_x)  # raw uint8 (N, H, W): one channel, no channel dim
    assert probabilities.shape == (256, 4) and torch.allclose(probabilities.sum(1), torch.ones(256))
    accuracy = float((probabilities.argmax(1) == torch.as_tensor(test_y)).float().mean())
    assert accuracy == result.final_accuracy  # the evaluator's own number, exactly
    floats = result.predict(torch.as_tensor(test_x[:8]).float() / 255)  # floats in [0, 1] work too
    assert torch.allclose(floats, probabilities[:8], atol=1e-5)


def test_saved_file_is_weights_only_and_loads_back_as_a_module(trained):
    result, path, _, _, test_x, _ = trained
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "speedrun-model" and payload["classes"] == list(result.classifier.classes)
    assert payload["image_size"] == [28, 28] and len(payload["mean"]) == 1
    loaded = speedrun.load(path)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    assert torch.equal(loaded.predict(test_x), result.predict(test_x))


def test_predict_command_decodes_files_as_training_did(trained, capsys):
    result, path, _, root, test_x, _ = trained
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray(test_x[i]).convert("RGB").save(folder / f"img{i}.png")  # RGB: converted to grey
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", str(path), str(folder), "--top-k", "2", "--json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert [p["file"].rsplit("/", 1)[1] for p in got["predictions"]] == ["img0.png", "img1.png", "img2.png"]
    expected = result.predict(test_x[:3])
    for row, probs in zip(got["predictions"], expected):
        assert len(row["top"]) == 2
        assert row["top"][0]["class"] == result.classifier.classes[int(probs.argmax())]
        assert row["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert "skipped" in captured.err and "notes.txt" in captured.err
    assert main(["predict", str(path), str(folder / "img0.png")]) == 0
    assert "img0.png:" in capsys.readouterr().out
    assert main(["predict", str(path), str(folder / "img2.png"), str(folder / "img0.png")]) == 0  # several files
    assert [line.split(":")[0].rsplit("/", 1)[1] for line in capsys.readouterr().out.splitlines()
            if line.endswith("%")] == ["img2.png", "img0.png"]


def test_evaluate_command_matches_the_run(trained, capsys, monkeypatch):
    result, path, data, root, _, _ = trained
    monkeypatch.setenv("SPEEDRUN_HOME", str(root / "home"))
    assert main(["evaluate", str(path), "--data", str(data), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["accuracy"] == result.final_accuracy and got["images"] == 256 and got["tta_flip"]


def test_export_onnx_matches_onnxruntime(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    _, path, _, _, test_x, _ = trained
    target = tmp_path / "model.onnx"
    assert main(["export", str(path), "--out", str(target)]) == 0
    pixels = torch.as_tensor(test_x[:5]).float().unsqueeze(1)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixels": pixels.numpy()})
    with torch.inference_mode():
        expected = speedrun.load(path)(pixels)
    assert np.allclose(got, expected.numpy(), atol=1e-4)


def test_export_without_onnx_says_what_to_install(trained, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    assert main(["export", str(trained[1])]) == 2
    assert "pip install 'speedrun[onnx]'" in capsys.readouterr().err


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/speedrun-exploit-ran",))


def test_files_that_are_not_speedrun_models_are_refused_without_running_them(tmp_path, capsys):
    import os

    marker = "/tmp/speedrun-exploit-ran"
    if os.path.exists(marker):
        os.remove(marker)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "speedrun-model", "x": _Exploit()}))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    for path, message in ((evil, "is not a speedrun model file"), (other, "no 'speedrun-model' marker"),
                          (text, "is not a speedrun model file"), (tmp_path / "none.pt", "model file not found")):
        assert main(["predict", str(path), str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(marker)  # weights-only: the pickle's code never ran


def test_wrong_images_are_refused_by_shape_and_file(trained, tmp_path, capsys):
    result, path, _, _, test_x, _ = trained
    with pytest.raises(ConfigError, match=r"takes 1-channel 28x28 images, \(N, 1, 28, 28\); got shape \(2, 3, 32, 32\)"):
        result.predict(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert main(["predict", str(path), str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.png: cannot read it as an image" in err and len(err.splitlines()) == 1


def test_train_save_flag_writes_a_loadable_model(synthetic_dir, tmp_path, capsys):
    target = tmp_path / "out" / "net.pt"
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    main(["train", "--data", str(synthetic_dir), "--save", str(target), "--target", "0.99", *sets])
    assert f"saved             {target}" in capsys.readouterr().out
    assert speedrun.load(target).classes == speedrun.load(target).classes  # loads
    assert main(["train", "--data", str(synthetic_dir), "--save", str(tmp_path), *sets]) == 2
    assert "is a folder" in capsys.readouterr().err
