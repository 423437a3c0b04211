"""Benchmark one-time dataset preparation: `speedrun data prepare` from a cold cache.

    .venv/bin/python benchmarks/bench_prepare.py [SOURCE] [--runs 3] [--write]

SOURCE defaults to ../shared/data/cifar10-jpeg.tar.gz (60,000 JPEGs in an image-folder archive).
Each run is a fresh `python -m speedrun data prepare SOURCE --json` process with its own empty
SPEEDRUN_HOME, so it pays everything a first prepare pays: extracting the archive, decoding every
image with a thread per core, computing mean/std and writing the uint8 cache. Timed: the whole command
(wall clock, interpreter start included) and, as the command reports them, the prepare time and the
decode rate. Memory: the prepare command's largest resident set, from getrusage(RUSAGE_CHILDREN) in
a launcher around it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ROOT, replace_section  # noqa: E402

LAUNCHER = """
import json, os, resource, subprocess, sys, time
start = time.perf_counter()
out = subprocess.run([sys.executable, "-m", "speedrun", "data", "prepare", sys.argv[1], "--json"],
                     capture_output=True, text=True, check=True).stdout
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "result": json.loads(out)}))
"""


def one_run(source: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as home:
        env = {**os.environ, "SPEEDRUN_HOME": home}
        out = subprocess.run([sys.executable, "-c", LAUNCHER, source], capture_output=True, text=True,
                             check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    import torch  # only for the environment line

    from speedrun.env import environment
    env = environment(torch.device("cpu"))
    print(f"{env['device_name']}, torch {env['torch_version']}, code {env['code_version']}")
    runs = []
    for i in range(args.runs):
        r = one_run(args.source)
        details = r["result"].get("details", {})
        runs.append({"wall": r["wall_s"], "prepare": r["result"]["prepare_s"],
                     "decode_ips": details.get("decode_images_per_s", 0.0),
                     "images": r["result"]["train"] + r["result"]["test"],
                     "threads": details.get("threads"), "rss_mb": r["max_rss_kb"] / 1024})
        print(f"  run {i}: command {runs[-1]['wall']:.1f} s, prepare {runs[-1]['prepare']:.1f} s, decode "
              f"{runs[-1]['decode_ips']:,.0f} images/s, peak RSS {runs[-1]['rss_mb']:.0f} MB", flush=True)

    def stat(key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    table = "\n".join([
        "| measure | median (min-max) |",
        "|---|---|",
        f"| whole command, cold cache (s) | {stat('wall', '{:.1f}')} |",
        f"| prepare as reported: extract + decode + write (s) | {stat('prepare', '{:.1f}')} |",
        f"| decode rate ({runs[0]['threads']} threads, images/s) | {stat('decode_ips', '{:,.0f}')} |",
        f"| whole prepare rate (images/s) | {statistics.median(r['images'] / r['prepare'] for r in runs):,.0f} |",
        f"| peak resident set of the command (MB) | {stat('rss_mb', '{:.0f}')} |",
    ])
    print(table)
    if args.write:
        body = (f"## `speedrun data prepare` (one-time preparation)\n\n"
                f"Measured {date.today()} with `benchmarks/bench_prepare.py --runs {args.runs}` on "
                f"{env['device_name']}, torch {env['torch_version']}, code {env['code_version']}: "
                f"{Path(args.source).name}, {runs[0]['images']:,} images, each run a fresh command with an empty "
                f"cache (archive extraction included).\n\n{table}\n")
        replace_section(ROOT / "BENCHMARKS.md", "prepare", body)
        print("BENCHMARKS.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
