"""``speedrun predict``, ``evaluate`` and ``export``: use a model saved by ``speedrun train --save``.

    speedrun predict model.pt shirt.png --top-k 3
    speedrun evaluate model.pt --data fashion-mnist
    speedrun export model.pt --format onnx
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from speedrun.argtypes import positive_int
from speedrun.config import ConfigError
from speedrun.console import new_console
from speedrun.data import DataError

out = new_console(highlight=False)
err = new_console(stderr=True, highlight=False)


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or every non-hidden file below it, sorted (as image-folder trees are read)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"no such file or folder: {path}")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    if not found:
        raise DataError(f"{path}: no files to classify")
    return found


def _describe(classifier) -> str:
    tta = [name for name, on in (("flip", classifier.tta_flip),
                                 (f"+-{classifier.tta_translate_px} px shifts", classifier.tta_translate_px)) if on]
    c, (h, w) = classifier.in_channels, classifier.image_size
    return (f"{classifier.recipe.get('name', '?')} model, {len(classifier.classes)} classes, {c}x{h}x{w} input, "
            f"TTA {' + '.join(tta) if tta else 'none'}, {classifier.precision}")


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from speedrun.data.imagefolder import Aspect, decode_image
    from speedrun.inference import load

    classifier = load(args.model)
    files = [f for path in args.images for f in image_files(Path(path))]
    data = classifier.recipe.get("data", {})
    aspect = data.get("layout") == "aspect"
    # Decoded exactly as the run's evaluations saw images: the square cache's cover-resize and centre crop,
    # or, for a model trained on the aspect cache, its decode then the resize-and-centre-crop of its evaluation.
    layout = Aspect(classifier.in_channels, data.get("max_size") or 1 << 30) if aspect else (
        classifier.in_channels, *classifier.image_size)
    decoded, names, skipped = [], [], []
    for f in files:
        try:
            decoded.append(decode_image(str(f), layout)[0])
            names.append(f)
        except Exception as e:  # Pillow raises many kinds for a file that is not an image
            if len(files) == 1:
                raise DataError(f"{f}: cannot read it as an image ({type(e).__name__}: {e})") from None
            skipped.append((f, f"{type(e).__name__}: {e}"))
    if not decoded:
        raise DataError(f"{' '.join(args.images)}: none of its {len(files)} files could be read as an image")
    if aspect:
        import torch

        from speedrun.data.crops import centre_views, crop_resize_each

        frac = classifier.recipe.get("eval", {}).get("crop_frac", 0.875)
        sizes = np.array([image.shape[1:] for image in decoded], dtype=np.int64)
        views = centre_views(sizes, classifier.image_size[0], frac)
        pixels = crop_resize_each([torch.from_numpy(np.ascontiguousarray(im)) for im in decoded], views,
                                  classifier.image_size[0])
        probabilities = classifier.predict(pixels.contiguous().numpy())
    else:
        probabilities = classifier.predict(np.stack(decoded))
    k = min(args.top_k, len(classifier.classes))
    top = probabilities.topk(k, dim=1)
    rows = [{"file": str(f), "top": [{"class": classifier.classes[i], "probability": float(p)}
                                     for p, i in zip(ps.tolist(), idx.tolist())]}
            for f, ps, idx in zip(names, top.values, top.indices)]
    if args.json:
        print(json.dumps({"model": str(args.model), "predictions": rows,
                          "skipped": [{"file": str(f), "reason": why} for f, why in skipped]}))
    else:
        out.print(f"[dim]{_describe(classifier)}[/]")
        for row in rows:
            guesses = ", ".join(f"{g['class']} {g['probability']:.1%}" for g in row["top"])
            out.print(f"{row['file']}: {guesses}", markup=False)
    for f, why in skipped:
        err.print(f"speedrun: skipped {f}: not an image ({why})", markup=False)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from speedrun import data as datalib
    from speedrun.inference import load

    classifier = load(args.model)
    if args.no_tta:
        classifier.tta_flip, classifier.tta_translate_px = False, 0
    recipe = classifier.recipe.get("data", {})
    aspect = recipe.get("layout") == "aspect"  # cropped from each image as the run's evaluations were
    options = {"max_size": recipe["max_size"]} if recipe.get("max_size") else {}  # decoded as training was
    source = datalib.resolve(args.data, layout="aspect" if aspect else None, **options)
    images = datalib.load_prepared(datalib.prepare(source).directory, mmap=True)
    if (not aspect and tuple(images.image_size) != classifier.image_size) or images.channels != classifier.in_channels:
        raise DataError(f"{args.data} decodes to {images.channels}x{images.image_size[0]}x{images.image_size[1]} "
                        f"images; the model takes {classifier.in_channels}x{classifier.image_size[0]}x"
                        f"{classifier.image_size[1]}")
    if tuple(images.classes) != classifier.classes:
        missing = sorted(set(images.classes) ^ set(classifier.classes))
        raise DataError(f"{args.data} has other classes than the model ({', '.join(missing[:5]) or 'another order'})")
    y = torch.as_tensor(np.array(images.test_labels))[:args.limit or None]
    if aspect:  # resize and centre crop at the model's test resolution, in pixel units (mean 0, std 1/255)
        loader = datalib.CropLoader(
            images.test_images.to("cpu"), y.numpy(), size=classifier.image_size[0], train=False, batch_size=256,
            crop_frac=classifier.recipe.get("eval", {}).get("crop_frac", 0.875), mean=(0.0,) * images.channels,
            std=(1 / 255,) * images.channels)
        batches = ((x / 255, labels) for x, labels in loader.epoch(0))
    else:
        x = images.test_images[:len(y)]
        batches = ((x[i:i + 4096], y[i:i + 4096]) for i in range(0, len(y), 4096))
    correct = sum(int((classifier.predict(x).argmax(1) == labels).sum()) for x, labels in batches)
    result: dict[str, Any] = {"model": str(args.model), "data": str(args.data), "images": len(y),
                              "accuracy": correct / len(y), "tta_flip": classifier.tta_flip,
                              "tta_translate_px": classifier.tta_translate_px}
    if args.json:
        print(json.dumps(result))
    else:
        out.print(f"accuracy {result['accuracy']:.2%} on the {len(y):,} held-out images of {images.name} "
                  f"({_describe(classifier)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from speedrun.inference import export_onnx, load

    if args.format != "onnx":
        raise ConfigError(f"unknown export format {args.format!r}; known: onnx")
    classifier = load(args.model)
    target = Path(args.out) if args.out else Path(args.model).with_suffix(".onnx")
    export_onnx(classifier, target)
    out.print(f"wrote {target}: input 'pixels' (N, {classifier.in_channels}, {classifier.image_size[0]}, "
              f"{classifier.image_size[1]}) float in [0, 255]; output 'logits' (N, {len(classifier.classes)}); "
              "normalization and TTA inside")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("predict", help="classify image files with a model saved by train --save")
    p.add_argument("model", help="a model file written by speedrun train --save")
    p.add_argument("images", nargs="+", help="image files, or folders (every file below them)")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("evaluate", help="accuracy of a saved model on a dataset's held-out split")
    e.add_argument("model", help="a model file written by speedrun train --save")
    e.add_argument("--data", required=True, help="dataset: a built-in name or a path")
    e.add_argument("--no-tta", action="store_true", help="without the recipe's test-time augmentation")
    e.add_argument("--limit", type=positive_int, help="only the first N held-out images")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a saved model (ONNX; needs the onnx extra)")
    x.add_argument("model", help="a model file written by speedrun train --save")
    x.add_argument("--format", default="onnx", help="onnx (the only one so far)")
    x.add_argument("--out", help="output file (default: the model's path with .onnx)")
    x.set_defaults(func=cmd_export)
