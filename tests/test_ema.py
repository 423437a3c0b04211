import importlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import speedrun
from speedrun.config import AverageConfig, ConfigError, Recipe
from speedrun.measure.clock import Clock
from speedrun.techniques.averaging import EMA, bias_corrected_decay, ema_update
from speedrun.train.hooks import Evaluator
from speedrun.train.loop import FitState, fit
from tests.conftest import TINY


def test_ema_update_matches_the_formula():
    avg, params = [torch.tensor([1.0, -2.0]), torch.tensor([[4.0]])], [torch.tensor([3.0, 2.0]), torch.tensor([[0.0]])]
    ema_update(avg, params, 0.75)
    assert torch.allclose(avg[0], 0.75 * torch.tensor([1.0, -2.0]) + 0.25 * torch.tensor([3.0, 2.0]))
    assert torch.allclose(avg[1], torch.tensor([[3.0]]))
    assert torch.equal(params[0], torch.tensor([3.0, 2.0]))  # the live weights are only read


@pytest.mark.parametrize("decays", [[0.9] * 6, [0.5, 0.99, 0.9, 0.0, 0.7]])
def test_bias_corrected_updates_are_the_normalised_weighted_mean(decays):
    """Adam's correction: an EMA from zeros divided by 1 - prod(decays) weights x_i by (1 - d_i) prod_{j>i} d_j."""
    xs = [float(i * i - 3) for i in range(len(decays))]
    avg, remaining = [torch.tensor([123.0])], 1.0  # the starting value must vanish
    for x, d in zip(xs, decays):
        ema_update(avg, [torch.tensor([x])], bias_corrected_decay(d, remaining))
        remaining *= d
    weights = [(1 - d) * torch.tensor(decays[i + 1:]).prod().item() for i, d in enumerate(decays)]
    assert avg[0].item() == pytest.approx(sum(w * x for w, x in zip(weights, xs)) / sum(weights))
    assert bias_corrected_decay(0.9, 1.0) == 0.0  # the first update replaces the initial weights


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_ema_hook_averages_on_its_cadence_and_hands_the_copy_to_evaluations():
    model, d = _net(), 0.8
    hook = EMA(AverageConfig(kind="ema", every=3, decay=d))
    state = SimpleNamespace(model=model, step=0, max_steps=7, eval_model=None)
    hook.before_fit(state)
    seen = {}
    for step in range(1, 8):
        with torch.no_grad():  # live weights and BN statistics that equal the step number
            for t in (*model.parameters(), model[1].running_mean):
                t.fill_(step)
        state.step = step
        hook.after_step(state)
        seen[step] = None if state.eval_model is None else state.eval_model[0].weight[0, 0].item()
    assert seen[1] is None and seen[2] is None  # nothing averaged yet: evaluations use the live model
    assert seen[3] == pytest.approx(3.0)  # the first average is the weights themselves, not the init
    big = d**3  # updates at steps 3 and 6 cover 3 steps each, the last (step 7) one step
    assert seen[6] == pytest.approx(((1 - big) * big * 3 + (1 - big) * 6) / (1 - big**2))
    w3, w6, w7 = (1 - big) * big * d, (1 - big) * d, 1 - d
    expected = (w3 * 3 + w6 * 6 + w7 * 7) / (w3 + w6 + w7)
    assert (w3 + w6 + w7) == pytest.approx(1 - d**7)
    assert seen[7] == pytest.approx(expected)
    averaged = state.eval_model
    assert averaged is not model and all(not p.requires_grad for p in averaged.parameters())
    assert torch.equal(averaged[1].running_mean, torch.full((2,), 7.0))  # BN statistics copied from live
    assert torch.equal(model[0].weight, torch.full((2, 2), 7.0))  # training weights untouched
    hook.after_fit(state)  # the final model is the average
    assert model[0].weight[0, 0].item() == pytest.approx(expected)


def test_ema_after_fit_leaves_the_model_alone_without_an_update():
    model = _net()
    state = SimpleNamespace(model=model, step=0, max_steps=10, eval_model=None)
    hook = EMA(AverageConfig(kind="ema", every=5, decay=0.9))
    hook.before_fit(state)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    live = model[0].weight.detach().clone()
    hook.after_fit(state)
    assert torch.equal(model[0].weight, live)


class _Loader:
    def __init__(self):
        torch.manual_seed(1)
        self.batches = [(torch.randn(8, 2), torch.randint(0, 2, (8,))) for _ in range(2)]

    def __len__(self):
        return len(self.batches)

    def epoch(self, e):
        return iter(self.batches)


def test_listed_after_the_evaluator_evaluations_see_the_fresh_average(monkeypatch):
    """after_step runs in reverse: the EMA updates first, then the evaluator evaluates its copy."""
    hooks = importlib.import_module("speedrun.train.hooks")  # speedrun.train is also the train() function

    evaluated = []

    def spy(model, loader, **kw):
        evaluated.append((model, model[0].weight.detach().clone()))
        return 0.0, 1.0

    monkeypatch.setattr(hooks, "evaluate", spy)
    model = _net()
    state = FitState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                     loss_fn=nn.functional.cross_entropy, loader=_Loader(), schedule_steps=6, max_steps=6)
    ema = EMA(AverageConfig(kind="ema", every=2, decay=0.5))
    fit(state, [Evaluator(_Loader(), clock=Clock().start(), target=None, every_steps=2), ema])
    assert len(evaluated) == 3 and all(m is ema.averaged for m, _ in evaluated)
    assert torch.equal(evaluated[-1][1], model[0].weight)  # the last evaluation saw the final model
    assert not torch.equal(evaluated[0][1], evaluated[-1][1])


def test_ema_recipe_keys():
    r = Recipe().override({"average.kind": "ema", "average.decay": "0.99", "average.every": "4"})
    assert (r.average.kind, r.average.decay, r.average.every) == ("ema", 0.99, 4)
    with pytest.raises(ConfigError, match="average.decay"):
        Recipe().override({"average.kind": "ema", "average.decay": "1.0"})


def test_ema_trains_end_to_end(synthetic_dir):
    result = speedrun.train(data=synthetic_dir, target=0.6, store=None, overrides={
        **TINY, "average.kind": "ema", "average.decay": "0.9", "average.every": "2"})
    assert result.reached, result.detail
