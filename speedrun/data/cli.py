"""``speedrun data``: decode a dataset once into the uint8 cache, and show what a cache holds.

    speedrun data prepare ~/data/imagenette.tar.gz --max-size 64
    speedrun data info cifar10 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


from speedrun import data as datalib  # its names load on first use: `speedrun --help` needs no numpy
from speedrun.argtypes import positive_int
from speedrun.console import escape, new_console
from speedrun.data import DataError

out = new_console(highlight=False)
err = new_console(stderr=True, highlight=False)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1; got {value}")
    return value


def cache_info(directory: Path) -> dict[str, Any]:
    """What a prepared cache holds, from its meta.json and its files (caches of any version)."""
    meta = datalib.read_meta(directory)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return {"name": meta["name"], "cache": str(directory), "source": meta.get("source"),
            "source_type": meta.get("source_type"), "fingerprint": meta.get("fingerprint"),
            "num_classes": len(meta["classes"]), "classes": meta["classes"], "train": meta.get("train"),
            "test": meta.get("test"), "counts": meta.get("counts"), "shape": meta.get("shape"),
            "layout": meta.get("layout", "square"),
            "mean": meta["mean"], "std": meta["std"], "size_bytes": size, "prepare_s": meta.get("prepare_s"),
            "created": meta.get("created"), "details": meta.get("details", {}), "version": meta.get("version", 1)}


def _per_class(counts: list[int] | None) -> str:
    if not counts:
        return ""
    lo, hi = min(counts), max(counts)
    return f" ({lo:,} per class)" if lo == hi else f" ({lo:,} to {hi:,} per class)"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_info(info: dict[str, Any]) -> None:
    details = info["details"]
    counts = info["counts"] or {}
    classes = info["classes"]
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes) - 10} more)" if len(classes) > 10 else "")
    shape = "x".join(map(str, info["shape"])) if info["shape"] else "-"
    layout = info.get("layout", "square")
    if layout != "square" and info["shape"]:
        max_size = details.get("options", {}).get("max_size")
        lo, hi = details.get("shorter_side") or ("?", "?")
        kept = "stored" if layout == "aspect" else "decoded as training reads the files"
        shape = (f"{info['shape'][0]} channels, aspect kept, shorter side capped at {max_size} px ({kept}; in the "
                 f"source: shorter sides {lo if lo == hi else f'{lo}-{hi}'} px, aspect ratios up to "
                 f"{details.get('max_aspect', 0):.2f}); cropped to {info['shape'][1]}x{info['shape'][2]} unless "
                 "data.crop_size says otherwise")
    prepared = "-" if info["prepare_s"] is None else f"{info['created'] or '-'} in {info['prepare_s']:.1f} s"
    if "decode_images_per_s" in details:
        # caches prepared before decoding moved to threads name their worker processes
        unit, n = ("thread", details["threads"]) if "threads" in details else ("process", details["processes"])
        prepared += f"; decoded {details['decode_images_per_s']:,.0f} images/s with {n} {unit}{'' if n == 1 else 's'}"
    rows = [
        ("cache", info["cache"]),
        ("source", f"{info['source'] or '-'}" + (f" ({info['source_type']})" if info["source_type"] else "")),
        ("fingerprint", info["fingerprint"] or "-"),
        ("classes", f"{info['num_classes']}: {shown}"),
        ("train", f"{info['train']:,} images{_per_class(counts.get('train'))}"),
        ("test", f"{info['test']:,} images{_per_class(counts.get('test'))}"
                 + (f", from {details['test_from']}" if details.get("test_from") else "")),
        ("image shape", f"{shape} (channels x height x width), uint8" if layout == "square" else shape),
        ("mean", " ".join(f"{m:.4f}" for m in info["mean"])),
        ("std", " ".join(f"{s:.4f}" for s in info["std"])),
        ("on disk", _mib(info["size_bytes"]) + (" (the list of files; the images stay where they are)"
                                                 if layout == "files" else "")),
        ("prepared", prepared),
    ]
    if details.get("skipped"):
        rows.append(("skipped", f"{details['skipped']:,} files that cannot be decoded, e.g. "
                                f"{', '.join(details.get('skipped_files', [])[:3])}"))
    if details.get("options"):
        rows.append(("options", ", ".join(f"{k}={v}" for k, v in details["options"].items())))
    out.print(f"[bold]{escape(info['name'])}[/]", highlight=False)
    for key, value in rows:
        out.print(f"  {key:<12} {value}", markup=False)


def _source(args: argparse.Namespace, **kwargs):
    return datalib.resolve(args.path, max_size=args.max_size, holdout_frac=args.holdout_frac, layout=args.layout,
                           **kwargs)


def cmd_prepare(args: argparse.Namespace) -> int:
    prepared = datalib.prepare(_source(args, strict=args.strict, workers=args.workers))
    info = {**cache_info(prepared.directory), "built": prepared.built}
    if args.json:
        print(json.dumps(info))
        return 0
    if prepared.built:
        out.print(f"prepared {info['name']} in {prepared.prepare_s:.1f} s", markup=False)
    else:
        out.print(f"{info['name']} is already prepared and unchanged; reusing its cache", markup=False)
    _print_info(info)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    given = Path(args.path).expanduser()
    if (given / "meta.json").is_file():  # a cache folder itself
        directory = given
    else:
        directory = datalib.cache_path(_source(args, download=False))
        if not (directory / "meta.json").is_file():
            options = "".join(f" --{name.replace('_', '-')} {value}" for name, value in
                              (("max_size", args.max_size), ("holdout_frac", args.holdout_frac)) if value is not None)
            raise DataError(f"{args.path} is not prepared (no cache at {directory}); "
                            f"run `speedrun data prepare {args.path}{options}` first")
    info = cache_info(directory)
    if args.json:
        print(json.dumps(info))
    else:
        _print_info(info)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data prepare`` and ``data info`` to the ``speedrun`` command's subparsers."""
    data = subparsers.add_parser("data", help="prepare a dataset into the uint8 cache, or show a cache")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    def dataset_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("path", metavar="PATH", help="a built-in name (fashion-mnist, cifar10, cifar100), or a "
                                                    "folder or archive of IDX files, CIFAR batches or an image tree")
        p.add_argument("--max-size", type=positive_int,
                       help="image trees: larger images are resized so the shorter side is this, then "
                            "centre-cropped square (default 64)")
        p.add_argument("--layout", choices=("square", "aspect", "files"), default="square",
                       help="image trees: square (one size: shorter side, then centre crop), aspect (each image's "
                            "aspect kept, shorter side capped at --max-size) or files (only the list of files: "
                            "training decodes them, for sets too large to cache)")
        p.add_argument("--holdout-frac", type=_fraction,
                       help="image trees without val/ or test/: fraction of each class held out (default 0.1)")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = actions.add_parser("prepare", help="decode a dataset once into the cache (reused while the source "
                                           "and options are unchanged)")
    dataset_arguments(p)
    p.add_argument("--strict", action="store_true", help="fail on a file that cannot be decoded, instead of "
                                                         "skipping it with a warning")
    p.add_argument("--workers", type=positive_int, help="decode threads (default: every core)")
    p.set_defaults(func=cmd_prepare)

    i = actions.add_parser("info", help="show what a dataset's cache holds (PATH may also be the cache folder)")
    dataset_arguments(i)
    i.set_defaults(func=cmd_info)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """The data command on its own: ``python -m speedrun.data.cli data prepare PATH``."""
    parser = argparse.ArgumentParser(prog="speedrun")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        err.print(f"[bold red]speedrun: error:[/] {escape(str(e))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("speedrun: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
