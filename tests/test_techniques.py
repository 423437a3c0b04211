import math

import pytest
import torch

from speedrun.config import ScheduleConfig
from speedrun.techniques.label_smoothing import smooth_labels, smoothed_cross_entropy
from speedrun.techniques.schedules import LRSchedule, lr_factor, one_cycle, step_decay


def test_one_cycle_is_piecewise_linear():
    kw = dict(warmup_frac=0.2, start_factor=0.1, end_factor=0.05)
    assert one_cycle(0.0, **kw) == pytest.approx(0.1)
    assert one_cycle(0.1, **kw) == pytest.approx(0.55)
    assert one_cycle(0.2, **kw) == pytest.approx(1.0)
    assert one_cycle(0.6, **kw) == pytest.approx(1.0 - 0.95 * 0.5)
    assert one_cycle(1.0, **kw) == pytest.approx(0.05)
    assert one_cycle(1.7, **kw) == pytest.approx(0.05)  # clamped


def test_step_decay_and_constant():
    assert step_decay(0.99, gamma=0.7) == 1.0
    assert step_decay(2.5, gamma=0.7) == pytest.approx(0.49)
    assert lr_factor(ScheduleConfig(kind="constant"), progress=0.5, epoch=3) == 1.0


def test_schedule_hook_sets_every_group_from_its_peak():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "peak_lr": 1.0}, {"params": [p2], "peak_lr": 0.5}], lr=1.0)

    class State:
        optimizer, progress, epoch_float = opt, 0.125, 0.3

    LRSchedule(ScheduleConfig(kind="one-cycle", warmup_frac=0.25, start_factor=0.0)).before_batch(State)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])


def test_label_smoothing_matches_the_reference_formula():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 10), torch.randint(0, 10, (16,))
    soft = smooth_labels(targets, 10, 0.2)
    assert torch.allclose(soft.sum(1), torch.ones(16))
    assert soft[0, targets[0]] == pytest.approx(0.8 + 0.02) and soft.min() == pytest.approx(0.02)
    reference = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert smoothed_cross_entropy(logits, targets, 0.2) == pytest.approx(float(reference), rel=1e-5)
    assert smoothed_cross_entropy(logits, targets, 0.0) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, targets)))


def test_lookahead_step_matches_the_formula():
    from speedrun.techniques.averaging import lookahead_alpha, lookahead_step

    slow, fast = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    lookahead_step(slow, fast, alpha=0.75)
    assert torch.allclose(slow[0], torch.tensor([1.5, 3.0])) and torch.equal(fast[0], slow[0])
    assert lookahead_alpha(0.0, decay=0.95, every=5) == 0.0
    assert lookahead_alpha(1.0, decay=0.95, every=5) == pytest.approx(0.95**5)
    assert lookahead_alpha(0.5, decay=0.95, every=5) == pytest.approx(0.95**5 / 8)


def test_lookahead_hook_syncs_every_k_steps_and_at_the_end():
    from speedrun.config import AverageConfig
    from speedrun.techniques.averaging import Lookahead

    model = torch.nn.Linear(2, 1)

    class State:
        step, max_steps, progress, at_end = 0, 7, 1.0, False

    State.model = model
    hook = Lookahead(AverageConfig(kind="lookahead", every=3, decay=0.9))
    hook.before_fit(State)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    State.step = 2
    hook.after_step(State)  # not a multiple of 3: untouched
    assert torch.allclose(model.weight, start + 1)
    State.step = 3
    hook.after_step(State)
    alpha = 0.9**3
    assert torch.allclose(model.weight, start + (1 - alpha)) and torch.allclose(hook.slow[0], model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    State.step, State.at_end = 7, True  # the last step syncs even off the cadence
    hook.after_step(State)
    assert torch.allclose(model.weight, start + (1 - alpha) + (1 - alpha))


def test_warmup_cosine_matches_the_formula():
    from speedrun.techniques.schedules import warmup_cosine

    kw = dict(warmup_frac=0.2, start_factor=0.0, end_factor=0.1)
    assert warmup_cosine(0.1, **kw) == pytest.approx(0.5)
    assert warmup_cosine(0.2, **kw) == pytest.approx(1.0)
    t = (0.7 - 0.2) / 0.8
    assert warmup_cosine(0.7, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert warmup_cosine(1.0, **kw) == pytest.approx(0.1)
    assert lr_factor(ScheduleConfig(kind="cosine", warmup_frac=0.0, end_factor=0.0), progress=0.5,
                     epoch=0) == pytest.approx(0.5)


def test_momentum_cycles_against_the_lr_and_the_hook_sets_it():
    from speedrun.techniques.schedules import cycled_momentum

    kw = dict(warmup_frac=0.25, high=0.95, low=0.85)
    assert cycled_momentum(0.0, **kw) == pytest.approx(0.95)
    assert cycled_momentum(0.25, **kw) == pytest.approx(0.85)
    assert cycled_momentum(0.625, **kw) == pytest.approx(0.90)
    assert cycled_momentum(1.0, **kw) == pytest.approx(0.95)

    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([{"params": [p], "peak_lr": 1.0}], lr=1.0, momentum=0.95)
    adam = torch.optim.AdamW([{"params": [p], "peak_lr": 1.0}], lr=1.0)

    class State:
        progress, epoch_float = 0.25, 0.0

    cfg = ScheduleConfig(kind="one-cycle", warmup_frac=0.25, momentum_low=0.85)
    for opt in (sgd, adam):
        State.optimizer = opt
        LRSchedule(cfg, momentum=0.95).before_batch(State)
    assert sgd.param_groups[0]["momentum"] == pytest.approx(0.85)
    assert adam.param_groups[0]["betas"][0] == pytest.approx(0.85)
    State.optimizer = sgd
    LRSchedule(ScheduleConfig(kind="one-cycle"), momentum=0.95).before_batch(State)  # cycling off
    assert sgd.param_groups[0]["momentum"] == pytest.approx(0.85)  # left as it was


def test_readme_table_lists_the_catalog():
    from pathlib import Path

    from speedrun.techniques.registry import TECHNIQUES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Techniques\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows == [f"| `{t.name}` | {t.summary} | `{t.switch}` |" for t in TECHNIQUES.values()]
