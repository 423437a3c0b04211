"""Run the published airbench (`pip download airbench`) on an image-folder copy of CIFAR-10, on a CUDA GPU.

The control for `cifar10-94`'s GPU numbers: the same data, the reference implementation. It answers
"is a gap to airbench94's published 94.01% the recipe's or the data's?".

    pip download airbench --no-deps -d DIR && tar xzf DIR/airbench-*.tar.gz -C DIR
    python benchmarks/airbench_reference.py PATH/TO/cifar10-jpeg.tar.gz --airbench DIR/airbench-0.1.8 \
        --runs94 10 --runs95 3

The archive's images are decoded once (outside every clock) into the `cifar10/{train,test}.pt` files
airbench's loader reads, in a scratch directory. airbench needs torchvision only for `Normalize` and its
download path: where torchvision is not importable, a minimal stand-in is installed in `sys.modules`.
Each run is timed around airbench's training function (warm-up run excluded); accuracy is airbench's own
`evaluate` with its TTA level 2 (flip + 1 px translations) and, for reference, level 0.
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def write_airbench_files(archive: Path, into: Path) -> None:
    """Decode `split/class/*.jpg` members into airbench's {train,test}.pt (uint8 NHWC, int64 labels)."""
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] not in splits:
                continue
            pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
            images, labels = splits[parts[-3]]
            images.append(pixels)
            labels.append(CLASSES.index(parts[-2]))
    into.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        torch.save({"images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels),
                    "classes": CLASSES}, into / f"{split}.pt")
        print(f"{split}: {len(images)} images, per class {np.bincount(labels).tolist()}", flush=True)


def ensure_torchvision() -> str:
    try:
        import torchvision  # noqa: F401
        return "torchvision " + torchvision.__version__
    except Exception:  # absent, or built against another torch
        pass

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)

        def __call__(self, x):
            return (x - self.mean.to(x).view(-1, 1, 1)) / self.std.to(x).view(-1, 1, 1)

    def no_download(*args, **kwargs):
        raise RuntimeError("airbench_reference writes cifar10/*.pt itself; nothing to download")

    stub = types.ModuleType("torchvision")
    stub.transforms = types.SimpleNamespace(Normalize=Normalize)
    stub.datasets = types.SimpleNamespace(CIFAR10=no_download)
    sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms,
                        "torchvision.datasets": stub.datasets})
    return "a stand-in for torchvision (Normalize only)"


def summary(name: str, accs: list[float]) -> str:
    a = torch.tensor(accs)
    spread = f", std {a.std():.4f}" if len(accs) > 1 else ""
    return f"{name}: n={len(accs)} mean {a.mean():.4f}{spread}, min {a.min():.4f}, max {a.max():.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="CIFAR-10 as an image-folder tar (train/ and test/)")
    parser.add_argument("--airbench", type=Path, required=True, help="the unpacked airbench sdist")
    parser.add_argument("--runs94", type=int, default=10)
    parser.add_argument("--runs95", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: airbench needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; {ensure_torchvision()}", flush=True)
    sys.path.insert(0, str(args.airbench))
    import airbench
    from airbench.utils import CifarLoader, evaluate

    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        write_airbench_files(args.archive, Path(scratch) / "cifar10")
        print(f"decoded in {time.perf_counter() - t0:.1f} s (one-time, outside every clock)", flush=True)
        import os
        os.chdir(scratch)  # airbench's loaders read ./cifar10/
        test = CifarLoader("cifar10", train=False, batch_size=2000)
        airbench.warmup94(verbose=False)
        for name, train_fn, runs in (("train94", airbench.train94, args.runs94),
                                     ("train95", airbench.train95, args.runs95)):
            accs = []
            for run in range(runs):
                t0 = time.perf_counter()
                model = train_fn(run=run, verbose=False)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                accs.append(evaluate(model, test, tta_level=2))
                plain = evaluate(model, test, tta_level=0)
                print(f"{name} run {run}: accuracy {accs[-1]:.4f} (no TTA {plain:.4f}), "
                      f"training {seconds:.2f} s", flush=True)
            if accs:
                print(summary(name, accs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
