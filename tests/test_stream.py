"""The streaming loader against the resident one, its prefetch thread's shutdown, sharding over ranks,
and the choice between the loaders."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import speedrun
from speedrun import data as datalib
from speedrun.config import ConfigError, Recipe
from speedrun.data import ResidentLoader, StreamLoader, choose_loader, load_prepared, prepare, resolve
from speedrun.data.stream import Prefetcher
from speedrun.train.loop import FitState, StopFit, fit
from tests.conftest import TINY


@pytest.fixture
def prepared(synthetic_dir):
    """The synthetic set, prepared, as memory maps."""
    return load_prepared(prepare(resolve(str(synthetic_dir))).directory, mmap=True)


def prefetch_threads() -> int:
    return sum(t.name == "speedrun-prefetch" and t.is_alive() for t in threading.enumerate())


def both_loaders(data, *, split="train", **options):
    x, y = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
    common = dict(mean=data.mean, std=data.std, **options)
    resident = ResidentLoader(torch.as_tensor(np.array(x)), torch.as_tensor(np.array(y)), **common)
    return resident, StreamLoader(x, y, prefetch=2, **common)


AUGMENT = dict(flip=True, alternating_flip=True, translate_px=2, cutout_px=5)


@pytest.mark.parametrize("options", [{}, AUGMENT], ids=["plain", "augmented"])
def test_stream_batches_equal_the_resident_loaders(prepared, options):
    # The stream loader draws its order and augmentations from the same generator, in the same
    # sequence, so the batches match exactly even with augmentation on.
    resident, stream = both_loaders(prepared, batch_size=100, train=True, seed=3, channels_last=True, **options)
    assert len(stream) == len(resident) == 10 and stream.num_examples == resident.num_examples == 1000
    for epoch in (0, 1):
        if epoch == 1:
            resident.size = stream.size = 20  # progressive resizing reaches the stream loader too
        pairs = list(zip(resident.epoch(epoch), stream.epoch(epoch), strict=True))
        for (xr, yr), (xs, ys) in pairs:
            assert torch.equal(xr, xs) and torch.equal(yr, ys) and yr.dtype == ys.dtype
            assert xs.is_contiguous(memory_format=torch.channels_last)
        assert pairs[0][1][0].shape[-1] == (28 if epoch == 0 else 20)
    first = [y for _, y in stream.epoch(0)]
    assert not torch.equal(torch.cat(first), torch.cat([y for _, y in stream.epoch(1)]))  # reshuffled
    resident_eval, stream_eval = both_loaders(prepared, split="test", batch_size=100, train=False)
    batches = list(stream_eval.epoch(0))
    assert [len(y) for _, y in batches] == [100, 100, 56]
    for (xr, yr), (xs, ys) in zip(resident_eval.epoch(0), batches, strict=True):
        assert torch.equal(xr, xs) and torch.equal(yr, ys)


def test_stream_sample_for_data_dependent_init_equals_the_resident_loaders(prepared):
    resident, stream = both_loaders(prepared, batch_size=100, train=True, seed=5)
    drawn = stream.sample(300)
    assert drawn.shape == (300, 1, 28, 28) and drawn.dtype == torch.float32
    assert torch.equal(drawn, resident.sample(300))
    assert not torch.equal(drawn, both_loaders(prepared, batch_size=100, train=True, seed=6)[1].sample(300))


def test_prefetch_thread_exits_on_break_exception_interrupt_and_stopfit(prepared):
    _, stream = both_loaders(prepared, batch_size=32, train=True)
    before = prefetch_threads()
    for _ in stream.epoch(0):
        assert prefetch_threads() == before + 1
        break
    assert prefetch_threads() == before
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            for _ in stream.epoch(0):
                raise error("stop")
        assert prefetch_threads() == before
    assert next(stream.epoch(0))[0].shape[0] == 32  # the evaluator's one-batch peek
    assert prefetch_threads() == before

    class StopAtStep3:
        def after_step(self, state):
            if state.step == 3:
                raise StopFit("reached")

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 4))
    state = fit(FitState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                         loss_fn=torch.nn.functional.cross_entropy, loader=stream, schedule_steps=100,
                         max_steps=100), [StopAtStep3()])
    assert state.outcome == "reached" and state.step == 3 and prefetch_threads() == before


def test_a_read_error_reaches_the_consumer_and_ends_the_thread(prepared):
    _, stream = both_loaders(prepared, batch_size=32, train=True)
    stream._read = lambda rows: (_ for _ in ()).throw(OSError("disk gone"))
    before = prefetch_threads()
    with pytest.raises(OSError, match="disk gone"):
        list(stream.epoch(0))
    assert prefetch_threads() == before


def test_prefetcher_reads_at_most_depth_ahead():
    reads = []
    feed = Prefetcher(lambda i: reads.append(i) or i, range(100), depth=3)
    it = iter(feed)
    assert next(it) == 0
    time.sleep(0.2)  # time for the thread to run as far ahead as the queue lets it
    assert len(reads) <= 1 + 3 + 1  # the one taken, a full queue, one waiting to be put
    assert list(it) == list(range(1, 100))
    assert not feed.thread.is_alive()


@pytest.mark.parametrize("stream", [False, True], ids=["resident", "stream"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_equal_and_cover_the_epochs_order(stream, world_size):
    n, bs = 103, 8
    images = np.arange(n, dtype=np.uint8).repeat(4).reshape(n, 1, 2, 2)
    labels = np.arange(n)  # a label names its image

    def make(rank, world, train=True):
        opts = dict(batch_size=bs, mean=(0.0,), std=(1 / 255,), train=train, seed=7, rank=rank, world_size=world)
        if stream:
            return StreamLoader(images, labels, **opts)
        return ResidentLoader(torch.as_tensor(images), torch.as_tensor(labels), **opts)

    single = make(0, 1)
    shards = [make(r, world_size) for r in range(world_size)]
    steps = n // (bs * world_size)
    assert all(len(s) == steps and s.num_examples == steps * bs for s in shards)
    for epoch in (0, 1):
        order = single.epoch_order(epoch)  # every rank derives this same permutation from the seed
        served = []
        for shard in shards:
            batches = list(shard.epoch(epoch))
            assert all(torch.equal(x[:, 0, 0, 0].round().long(), y) for x, y in batches)  # images travel with labels
            served.append([y for _, y in batches])
        # Step i of all ranks together covers one contiguous stretch of the permutation, in rank order.
        together = torch.cat([served[r][i] for i in range(steps) for r in range(world_size)])
        assert torch.equal(together, order[:steps * bs * world_size])
        assert len(set(together.tolist())) == len(together)  # disjoint
    # Evaluation (no drop_last): every example once over the ranks, batch counts differing by at most one.
    evals = [[y for _, y in make(r, world_size, train=False).epoch(0)] for r in range(world_size)]
    assert sorted(torch.cat([torch.cat(e) for e in evals]).tolist()) == list(range(n))
    assert max(map(len, evals)) - min(map(len, evals)) <= 1
    with pytest.raises(ValueError, match="outside world_size"):
        make(world_size, world_size)


def test_rank_and_world_size_default_from_torch_distributed(monkeypatch):
    images, labels = torch.zeros((20, 1, 2, 2), dtype=torch.uint8), torch.arange(20)
    opts = dict(batch_size=4, mean=(0.0,), std=(1.0,), train=True)
    assert (ResidentLoader(images, labels, **opts).rank, ResidentLoader(images, labels, **opts).world_size) == (0, 1)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    loader = ResidentLoader(images, labels, **opts)
    assert (loader.rank, loader.world_size, len(loader)) == (1, 2, 2)
    explicit = ResidentLoader(images, labels, rank=0, world_size=1, **opts)
    assert (explicit.rank, explicit.world_size, len(explicit)) == (0, 1, 5)


def test_auto_picks_resident_when_the_set_fits_comfortably(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(datalib.stream, "available_memory", lambda device: 1000)
    assert choose_loader("auto", 500, cpu) == "resident"
    assert choose_loader("auto", 501, cpu) == "stream"
    assert choose_loader("resident", 10**12, cpu) == "resident" and choose_loader("stream", 1, cpu) == "stream"
    assert datalib.available_memory(cpu) > 0
    with pytest.raises(ConfigError, match="data.loader"):
        Recipe().override({"data.loader": "disk"})


def test_training_streamed_matches_training_resident(synthetic_dir):
    runs = {kind: speedrun.train(data=synthetic_dir, target=0.99, store=None, seed=2,
                                 overrides={**TINY, "data.loader": kind, "data.translate_px": "2"})
            for kind in ("resident", "stream")}
    assert runs["stream"].env["loader"] == "stream" and runs["resident"].env["loader"] == "resident"
    assert [p.accuracy for p in runs["stream"].curve] == [p.accuracy for p in runs["resident"].curve]
    assert runs["stream"].steps == runs["resident"].steps > 0


def test_ranks_draw_different_augmentations_for_their_batches():
    n = 64
    images = torch.arange(4, dtype=torch.uint8).repeat(n, 1).view(n, 1, 1, 4)  # identical asymmetric rows
    opts = dict(batch_size=16, mean=(0.0,), std=(1 / 255,), train=True, seed=1, flip=True, world_size=2)
    flips = [torch.cat([x[:, 0, 0, 0] > x[:, 0, 0, -1] for x, _ in ResidentLoader(images, torch.arange(n), rank=r,
                                                                                    **opts).epoch(0)])
             for r in (0, 1)]
    assert not torch.equal(flips[0], flips[1])  # a shared generator would mirror the same batch positions
