"""One rank of a data-parallel job, for tests/test_distributed.py: run under torchrun, or spawned.

``python tests/ddp_worker.py SPEC.json``: trains ``speedrun.train(**spec["train"])`` and writes this rank's
final weights to ``spec["out"]/rank<R>.pt`` and its result to ``rank<R>.json``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def train_rank(spec_path: str) -> None:
    from speedrun.train import distributed
    from speedrun.train.run import train

    spec = json.loads(Path(spec_path).read_text())
    result = train(**spec["train"])
    out, rank = Path(spec["out"]), os.environ.get("RANK", "0")
    torch.save(result.model.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result.to_dict(), default=str))
    distributed.shutdown()


def evaluate_rank(rank: int, world_size: int, port: int, out: str) -> None:
    """Spawned (torch.multiprocessing): evaluate a seeded net on a sharded loader, all-reduced."""
    import torch.distributed as dist

    from speedrun.data.loader import ResidentLoader
    from speedrun.train import distributed
    from speedrun.train.hooks import evaluate

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), SPEEDRUN_DIST_TIMEOUT_S="30")
    torch.set_num_threads(1)
    distributed.init("cpu")
    model, images, labels = eval_fixture()
    if rank == 1:  # rank 0's BatchNorm statistics are the ones evaluated: make rank 1's differ
        model[1].running_mean.fill_(5.0)
    loader = ResidentLoader(images, labels, batch_size=100, mean=(0.5,), std=(0.25,), train=False)
    accuracy, loss = evaluate(model, loader)
    torch.save({"accuracy": accuracy, "loss": loss, "served": loader.num_examples}, Path(out) / f"eval{rank}.pt")
    dist.barrier()
    distributed.shutdown()


def eval_fixture() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded net with BatchNorm, and 250 images: shards of 100, 100 and 50 (ranks 0: 150, 1: 100)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    model[1].running_mean.uniform_(-0.1, 0.1)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (250, 1, 12, 12), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (250,), generator=generator)
    return model, images, labels


if __name__ == "__main__":
    train_rank(sys.argv[1])
