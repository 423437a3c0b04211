"""The GPU recipes (cifar10-94, imagenet-resnet50) run end to end on a CPU, on tiny data in their formats."""
import pytest
import torch

from speedrun.config import ConfigError
from speedrun.data import ResidentLoader, load_prepared, prepare, resolve
from speedrun.measure import flops
from speedrun.recipes import get_recipe
from speedrun.techniques.conv_init import whitening_filters
from speedrun.techniques.registry import enabled_techniques
from speedrun.train.run import INIT_IMAGES, train
from tests.conftest import write_cifar10, write_tree


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: 1e11)  # seconds of matmuls, not ours


def test_cifar10_94_trains_on_cifar_batches_with_a_whitened_frozen_stem(tmp_path):
    folder = write_cifar10(tmp_path, per_batch=40, test=40)  # 200 random training images, 10 classes
    assert {"patch-whitening", "stem-freezing", "dirac-init", "lookahead", "alternating-flip"} <= set(
        enabled_techniques(get_recipe("cifar10-94")))
    seed = 3
    result = train("cifar10-94", data=folder, store=None, seed=seed, device="cpu", overrides={
        "model.widths": "8,16,16", "train.batch_size": "64", "train.epochs": "2", "train.precision": "fp32"})
    assert result.outcome == "budget_exhausted", result.detail  # random labels: it ran, and could not reach 94%
    assert result.steps == 6 and len(result.curve) == 1  # 3 steps an epoch; one evaluation, at the end
    # The stem holds the whitening of the run's own training sample, unchanged by training (frozen).
    images = load_prepared(prepare(resolve(folder)).directory)
    loader = ResidentLoader(torch.as_tensor(images.train_images), torch.as_tensor(images.train_labels),
                            batch_size=64, mean=images.mean, std=images.std, train=True, seed=seed)
    expected = whitening_filters(loader.sample(INIT_IMAGES), 2, result.recipe.model.whiten_eps)
    assert torch.allclose(result.model.stem.weight, expected)
    assert not torch.equal(result.model.stem.bias, torch.zeros(24))  # the bias trains (for the first 3 epochs
    assert result.model.stem.bias.requires_grad  # of 9.9, and is trainable again in the model handed back)


def test_imagenet_resnet50_trains_on_an_image_folder_tree(tmp_path):
    classes = {name: 6 for name in ("ant", "bee", "cat", "dog")}
    tree = write_tree(tmp_path / "tree", {"train": classes, "val": {c: 3 for c in classes}}, size=16)
    with pytest.raises(ConfigError, match="names no dataset: give one with --data PATH"):
        train("imagenet-resnet50", store=None)
    result = train("imagenet-resnet50", data=tree, store=None, device="cpu", overrides={
        "model.widths": "4,4,8,8", "model.stem": "small", "data.max_size": "12", "data.crop_size": "12",
        "eval.crop_size": "14", "train.batch_size": "8", "train.epochs": "2", "train.precision": "fp32",
        "eval.batch_size": "16"})
    assert result.outcome == "budget_exhausted", result.detail
    assert [p.epoch for p in result.curve] == [1.0, 2.0]  # evaluated every epoch
    assert 0 < result.flops_per_image and result.env["precision"] == "fp32" and result.env["loader"] == "decode"
    again = prepare(resolve(tree, max_size=12, layout="files"))  # the run listed the tree's files
    assert not again.built and load_prepared(again.directory).image_size == (12, 12)
    assert result.classifier.image_size == (14, 14)  # evaluated at its test resolution
