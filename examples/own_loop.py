"""Your own PyTorch loop, with speedrun's pieces as plain functions: no trainer, no recipe.

    python examples/own_loop.py                 # Fashion-MNIST, 2 epochs, about 90%
    python examples/own_loop.py --limit 5000    # a slice, for a quick look

Each speed technique is one visible line: the loader keeps the uint8 set in memory and flips a
random half of each batch with a tensor op; the first conv is set by patch whitening and frozen;
the LR follows a one-cycle schedule (a pure function of progress); the loss is label-smoothed; the
clock counts everything after the dataset is prepared, evaluations included, as MLPerf does.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from speedrun import data as datalib
from speedrun.measure.clock import Clock
from speedrun.techniques.conv_init import init_whitening_
from speedrun.techniques.label_smoothing import smoothed_cross_entropy
from speedrun.techniques.schedules import one_cycle


def make_net(channels: int, classes: int) -> nn.Sequential:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(channels, 16), *block(16, 32), *block(32, 64),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, classes, bias=False))


@torch.inference_mode()
def accuracy(model: nn.Module, loader: datalib.ResidentLoader) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader.epoch(0))
    model.train()
    return correct / len(loader.labels)


def main(data: str = "fashion-mnist", *, epochs: float = 2.0, batch_size: int = 256, lr: float = 0.2,
         limit: int | None = None, seed: int = 0) -> float:
    images = datalib.load_prepared(datalib.prepare(datalib.resolve(data)).directory)  # one-time: decode and cache
    clock = Clock().start()
    torch.manual_seed(seed)
    x, y = torch.as_tensor(images.train_images[:limit]), torch.as_tensor(images.train_labels[:limit])
    train = datalib.ResidentLoader(x, y, batch_size=batch_size, train=True, flip=True, seed=seed,
                                   mean=images.mean, std=images.std)
    test = datalib.ResidentLoader(torch.as_tensor(images.test_images), torch.as_tensor(images.test_labels),
                                  batch_size=1024, train=False, mean=images.mean, std=images.std)
    model = make_net(images.channels, images.num_classes)
    init_whitening_(model[0], train.sample(5000))  # patch-whitening stem, frozen (no weight gradient)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                nesterov=True, weight_decay=5e-4)
    total = round(epochs * len(train))
    step = 0
    while step < total:
        for inputs, targets in train.epoch(step // len(train)):
            for group in optimizer.param_groups:
                group["lr"] = lr * one_cycle(step / total, warmup_frac=0.2, start_factor=0.0)
            loss = smoothed_cross_entropy(model(inputs), targets, 0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == total:
                break
    with clock.evaluating():
        result = accuracy(model, test)
    print(f"{result:.2%} after {epochs:g} epochs ({step} steps) in {clock.stop():.1f} s "
          f"(evaluation {clock.eval_s:.1f} s)")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--limit", type=int, help="train on the first N images only")
    args = parser.parse_args()
    main(args.data, epochs=args.epochs, limit=args.limit)
