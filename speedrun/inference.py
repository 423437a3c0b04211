"""Using a trained model: classify raw images, save it, load it back, export it.

A ``Classifier`` wraps the trained network with what it takes to classify images as they come:
the dataset's class names, its per-channel normalization, the input size trained at, and the
recipe's test-time augmentation and precision, so ``predict`` gives what the run's evaluation gave.

A saved model is a plain ``dict`` of tensors, numbers and strings (``torch.save``), readable with
``torch.load(path, weights_only=True)``: loading one never runs code from the file. The network is
rebuilt from its recipe (a registered model, or a factory's import path) and the weights loaded in.

>>> result = speedrun.train("fashion-mnist")  # doctest: +SKIP
>>> result.save("model.pt")  # doctest: +SKIP
>>> classifier = speedrun.load("model.pt")  # doctest: +SKIP
>>> probabilities = classifier.predict(images)  # uint8 (N, C, H, W), or floats in [0, 1]  # doctest: +SKIP
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from speedrun.config import ConfigError, from_dict
from speedrun.techniques.precision import autocast_for
from speedrun.techniques.tta import tta_logits

FORMAT, VERSION = "speedrun-model", 1


class Classifier(nn.Module):
    """A trained network that takes images in pixel units and knows its classes.

    ``forward`` maps float images in [0, 255] (N, C, H, W) to logits, normalizing them as training did
    and averaging over the recipe's test-time views; ``predict`` takes uint8 images, or floats in
    [0, 1], in any of the usual shapes and returns class probabilities.
    """

    def __init__(self, net: nn.Module, *, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 image_size: Sequence[int], tta_flip: bool = False, tta_translate_px: int = 0,
                 channels_last: bool = False, precision: str = "fp32", recipe: dict | None = None,
                 info: dict | None = None) -> None:
        super().__init__()
        self.net = net
        self.classes = tuple(classes)
        self.image_size = tuple(int(s) for s in image_size)
        self.tta_flip, self.tta_translate_px = tta_flip, tta_translate_px
        self.channels_last, self.precision = channels_last, precision
        self.recipe, self.info = recipe or {}, info or {}
        self.mean, self.std = tuple(mean), tuple(std)
        # The loader's own normalization, term for term: x * (1 / (255 std)) - mean / std.
        self.register_buffer("scale", torch.tensor([1 / (255 * s) for s in std]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1),
                             persistent=False)
        self.eval()

    @property
    def in_channels(self) -> int:
        return len(self.mean)

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def forward(self, pixels: Tensor) -> Tensor:
        """Logits for float images in pixel units [0, 255], (N, C, H, W)."""
        x = torch.addcmul(self.shift, pixels, self.scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return tta_logits(self.net, x, flip=self.tta_flip, translate_px=self.tta_translate_px)

    def as_pixels(self, images: Tensor | np.ndarray) -> Tensor:
        """``images`` as a float (N, C, H, W) batch in [0, 255] on the model's device; refuses the wrong kind.

        uint8 values are pixels; floating-point values are taken to be in [0, 1] (torchvision's
        ``ToTensor`` convention). One image may come without its batch dimension, and one-channel
        images without their channel dimension.
        """
        if isinstance(images, np.ndarray):
            images = np.array(images)  # a writable copy: torch refuses to wrap read-only maps silently
        x = torch.as_tensor(images)
        c, (h, w) = self.in_channels, self.image_size
        if x.ndim == 2 or (x.ndim == 3 and c == 1 and x.shape[0] != 1):
            x = x.unsqueeze(-3)  # (H, W) or (N, H, W): one channel
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ConfigError(f"this model takes {c}-channel {h}x{w} images, (N, {c}, {h}, {w}); got shape "
                              f"{tuple(torch.as_tensor(images).shape)}")
        if x.dtype == torch.uint8:
            return x.to(self.device, torch.float32)
        if not x.is_floating_point():
            raise ConfigError(f"images must be uint8 pixels or floats in [0, 1]; got {x.dtype}")
        return x.to(self.device, torch.float32) * 255

    @torch.inference_mode()
    def predict(self, images: Tensor | np.ndarray, *, batch_size: int = 512) -> Tensor:
        """Class probabilities, (N, classes) on the CPU; ``self.classes[i]`` names column i.

        >>> probabilities = result.predict(test_images)  # doctest: +SKIP
        >>> result.classifier.classes[int(probabilities[0].argmax())]  # doctest: +SKIP
        """
        x = self.as_pixels(images)
        was_training = self.training
        self.eval()
        autocast = autocast_for(self.precision, self.device)
        out = []
        for batch in x.split(batch_size):
            with autocast():
                out.append(torch.softmax(self(batch).float(), dim=1).cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def save(self, path: str | Path) -> Path:
        """Write the weights and what it takes to use them (see the module docstring); returns the path."""
        path = Path(path)
        net = getattr(self.net, "_orig_mod", self.net)  # under a torch.compile wrapper
        payload = {
            "format": FORMAT, "version": VERSION, "recipe": self.recipe, "classes": list(self.classes),
            "mean": list(self.mean), "std": list(self.std), "image_size": list(self.image_size),
            "tta_flip": self.tta_flip, "tta_translate_px": self.tta_translate_px,
            "channels_last": self.channels_last, "precision": self.precision, "info": self.info,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(payload, tmp)
            tmp.replace(path)  # never a half-written model under the final name
        except OSError as e:
            raise ConfigError(f"cannot write the model to {path}: {e.strerror or e}") from None
        return path


def load(path: str | Path, *, model: Callable[..., nn.Module] | nn.Module | None = None,
         device: str | torch.device = "cpu") -> Classifier:
    """A saved model as a ``Classifier`` (in eval mode) on ``device``.

    The network is rebuilt from the saved recipe: a registered model, or the factory at its import
    path. A model trained from a Python object (a local function, a module instance) is rebuilt by
    passing that factory or a fresh module as ``model``.
    """
    from speedrun.models import build_model, is_import_path

    payload = read_payload(path)
    recipe = from_dict(payload["recipe"])
    dims = dict(in_channels=len(payload["mean"]), num_classes=len(payload["classes"]),
                image_size=tuple(payload["image_size"]))
    with torch.random.fork_rng(devices=[]):  # building initialises weights we overwrite: leave the RNG be
        if isinstance(model, nn.Module):
            net = model
        elif model is not None or is_import_path(recipe.model.name) or recipe.model.name in _registered():
            net = build_model(recipe.model, factory=model, **dims)
        else:
            raise ConfigError(f"{path}: the model was {recipe.model.name}, which speedrun cannot rebuild; pass it "
                              "as load(path, model=factory_or_module)")
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path}: the weights do not fit model {recipe.model.name} ({first})") from None
    if payload["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    classifier = Classifier(net, classes=payload["classes"], mean=payload["mean"], std=payload["std"],
                            image_size=payload["image_size"], tta_flip=payload["tta_flip"],
                            tta_translate_px=payload["tta_translate_px"], channels_last=payload["channels_last"],
                            precision=payload["precision"], recipe=payload["recipe"], info=payload["info"])
    return classifier.to(device).eval()


def _registered() -> set[str]:
    from speedrun.models import MODELS

    return set(MODELS)


def read_payload(path: str | Path) -> dict[str, Any]:
    """The saved dict, read weights-only (no code runs); ConfigError for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails in many ways on foreign bytes (KeyError for an old pickle, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not a speedrun model file (it was read weights-only, so nothing in it "
                          f"ran): {reason[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a speedrun model file (no {FORMAT!r} marker); save one with "
                          "speedrun train --save PATH")
    if payload.get("version") != VERSION:
        raise ConfigError(f"{path}: model file version {payload.get('version')} is not {VERSION}; this speedrun "
                          "cannot read it")
    return payload


def export_onnx(classifier: Classifier, path: str | Path, *, batch_size: int | None = None) -> Path:
    """Export ``classifier.forward`` (pixels in [0, 255] -> logits, normalization and TTA included) to
    ONNX, with a dynamic batch dimension; needs the ``onnx`` package."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs it to write the file)
    except ImportError:
        raise ConfigError("exporting to ONNX needs the onnx package: pip install 'speedrun[onnx]' "
                          "(or pip install onnx onnxruntime)") from None
    path = Path(path)
    c, (h, w) = classifier.in_channels, classifier.image_size
    example = torch.full((batch_size or 2, c, h, w), 128.0, device=classifier.device)
    # The TorchScript exporter: the torch.export-based one needs onnxscript as well, for the same graph.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(classifier.eval(), (example,), str(path), input_names=["pixels"], output_names=["logits"],
                          dynamic_axes=None if batch_size else {"pixels": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    return path
