from dataclasses import replace

import pytest
import torch
from torch import nn

from speedrun.config import ConfigError, ModelConfig
from speedrun.models import build_model
from speedrun.techniques.freezing import FreezeOut, FreezeStem, freeze_
from speedrun.train.loop import FitState, fit

MODELS = {  # tiny versions of every model with a stem to freeze, and its input shape
    "convnet": (ModelConfig(name="convnet", widths=(4, 8, 8), pools=(0, 1), stem="whiten"), (2, 1, 12, 12)),
    "convnet-conv": (ModelConfig(name="convnet", widths=(4, 8, 8), pools=(0, 1)), (2, 1, 12, 12)),
    "airbench": (ModelConfig(name="airbench", widths=(8, 8), pools=(0, 1), stem="whiten"), (2, 3, 16, 16)),
    "resnet50": (ModelConfig(name="resnet50", widths=(4, 4, 4, 4), stem="small"), (2, 3, 16, 16)),
}


def second_layer_input(model: nn.Module) -> nn.Conv2d:
    """The first conv that is not part of the model's stem."""
    stem = {id(p) for p in model.stem_parameters()}
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m.weight) not in stem)


def eight_steps(model: nn.Module, *, batches: int) -> FitState:
    """A fit of 8 SGD steps of ``model`` (3 inputs, 2 classes) over an epoch of ``batches`` random batches of 4."""
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(batches)]

    class Loader:
        def __len__(self):
            return len(data)

        def epoch(self, e):
            return iter(data)

    return FitState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    loss_fn=nn.functional.cross_entropy, loader=Loader(), schedule_steps=8, max_steps=8)


def test_freeze_drops_gradients_and_returns_only_what_it_changed():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2), requires_grad=False)
    a.grad = torch.ones(2)
    assert freeze_([a, b]) == [a]
    assert not a.requires_grad and a.grad is None and not b.requires_grad
    assert freeze_([a, b]) == []


@pytest.mark.parametrize("name", MODELS)
def test_a_frozen_stem_stops_the_backward_at_the_second_layer(name):
    cfg, shape = MODELS[name]
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=shape[1], num_classes=10, image_size=shape[2:])
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.randn(40, *shape[1:]))
    stem = model.stem_parameters()
    assert stem and any(p.requires_grad for p in stem)
    second = second_layer_input(model)
    seen = []
    second.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].requires_grad))

    model(torch.randn(shape)).sum().backward()
    assert seen.pop() and all(p.grad is not None for p in stem if p.requires_grad)
    model.zero_grad(set_to_none=True)
    freeze_(stem)
    model(torch.randn(shape)).sum().backward()
    assert not seen.pop()  # nothing before the second layer needs a gradient: its input's is skipped
    assert all(p.grad is None for p in stem) and second.weight.grad is not None  # the rest still trains


def test_freeze_stem_hook_freezes_at_its_fraction_and_undoes_it_after_the_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    state = eight_steps(model, batches=4)
    stem, snapshots = list(model[0].parameters()), []

    class Watch:
        def after_step(self, state):
            snapshots.append((state.progress, [p.detach().clone() for p in stem], stem[0].requires_grad))

    hook = FreezeStem(stem, after_frac=0.5)
    fit(state, [hook, Watch()])
    trained = [s for s in snapshots if s[0] <= 0.5]  # steps that began before half the schedule
    frozen = [s for s in snapshots if s[0] > 0.5]
    assert len(trained) == 4 and all(s[2] for s in trained) and not any(s[2] for s in frozen)
    assert not torch.equal(trained[0][1][0], trained[-1][1][0])  # trained until the fraction ...
    assert all(torch.equal(s[1][0], trained[-1][1][0]) for s in frozen)  # ... then unchanged
    assert all(p.requires_grad for p in stem)  # after_fit undid it
    assert hook.frozen == stem


def test_freeze_stem_rejects_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="after_frac"):
        FreezeStem([], after_frac=1.5)


def test_a_model_without_a_stem_to_freeze_is_refused_by_name():
    from speedrun.recipes import get_recipe
    from speedrun.techniques.registry import check_model

    recipe = get_recipe("baseline").override({"model.stem_train_frac": 0.5})
    model = build_model(recipe.model, in_channels=1, num_classes=10, image_size=(28, 28))
    with pytest.raises(ConfigError, match="stem-freezing .*stem_parameters.*mnist-net has none: leave it out "
                                          "with --without stem-freezing"):
        check_model(recipe, model, model_name="mnist-net")


def test_runs_freeze_the_stem_from_the_start_or_at_the_fraction(synthetic_dir):
    import speedrun
    from tests.conftest import TINY

    never, half, always = (speedrun.train(data=synthetic_dir, store=None, stop_at_target=False,
                                          overrides={**TINY, "model.stem_train_frac": frac})
                           for frac in ("0", "0.5", "1"))
    for result in (never, half, always):
        assert result.outcome in ("reached", "budget_exhausted") and result.best_accuracy > 0.5, result.detail
    bn_never, bn_half = (next(m for m in r.model.modules() if isinstance(m, nn.BatchNorm2d)) for r in (never, half))
    assert not bn_never.weight.requires_grad  # never trained: still at its initial affine
    assert torch.equal(bn_never.weight, torch.ones_like(bn_never.weight)) and not bn_never.bias.any()
    assert bn_half.weight.requires_grad and bn_half.bias.any()  # trained for half the run, then handed back
    # FLOPs per image: the frozen steps skip the first layers' backward, and half the run was frozen
    assert never.flops_per_image < half.flops_per_image < always.flops_per_image
    assert half.flops_per_image == pytest.approx((never.flops_per_image + always.flops_per_image) / 2, rel=0.02)


def test_the_cli_refuses_a_model_without_a_stem_to_freeze_before_any_run(capsys, synthetic_dir):
    import json

    from speedrun.cli import main

    code = main(["train", "--recipe", "baseline", "--data", str(synthetic_dir), "--set", "model.stem_train_frac=0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "stem-freezing" in err and "mnist-net has none" in err and len(err.splitlines()) == 1
    main(["runs", "--json"])
    assert json.loads(capsys.readouterr().out) == []  # refused before a run was recorded


# ---------------------------------------------------------------- layer-freezing (FreezeOut)

BLOCK_MODELS = {name: MODELS[name] for name in ("convnet", "airbench", "resnet50")}


@pytest.mark.parametrize("name", BLOCK_MODELS)
def test_blocks_are_disjoint_after_the_stem_and_freezing_the_first_stops_the_backward_at_the_second(name):
    cfg, shape = BLOCK_MODELS[name]
    cfg = replace(cfg, widths=cfg.widths + (8,)) if name == "airbench" else cfg  # airbench: three groups
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=shape[1], num_classes=10, image_size=shape[2:])
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.randn(40, *shape[1:]))
    blocks, stem = model.block_parameters(), {id(p) for p in model.stem_parameters()}
    ids = [id(p) for block in blocks for p in block]
    assert len(blocks) >= 2 and all(blocks) and len(ids) == len(set(ids)) and not stem & set(ids)
    freeze_(model.stem_parameters())
    first_conv_of = [next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight is block[0])
                     for block in blocks]
    seen = []
    first_conv_of[1].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].requires_grad))
    freeze_(blocks[0])
    model(torch.randn(shape)).sum().backward()
    assert not seen.pop()  # nothing before the second block trains: its input gradient is skipped
    assert all(p.grad is None for p in blocks[0]) and all(p.grad is not None for p in blocks[1] if p.requires_grad)


def test_freezeout_freezes_each_block_at_its_fraction_front_to_back_and_resumes_its_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    state = eight_steps(model, batches=8)
    blocks = [list(layer.parameters()) for layer in model]
    trains = []  # (progress, does block 0 train, does block 1, does block 2)

    class Watch:
        def after_step(self, state):
            trains.append((state.progress, *(block[0].requires_grad for block in blocks)))

    hook = FreezeOut(blocks, (0.25, 0.5))
    fit(state, [hook, Watch()])
    # steps that began at progress < 0.25 trained everything; then block 0 froze; at 0.5 block 1 too
    assert [t[1:] for t in trains] == [(True, True, True)] * 2 + [(False, True, True)] * 2 + [(False, False, True)] * 4
    assert [start for start, _ in state.extras["freezes"]] == [2 * 4, 4 * 4]  # images seen at each freeze
    assert all(p.requires_grad for block in blocks for p in block)  # after_fit handed them back
    saved = hook.state_dict()
    again, fresh = FreezeOut(blocks, (0.25, 0.5)), eight_steps(model, batches=8)
    again.load_state_dict(saved, fresh)  # a resumed run freezes what the checkpoint had frozen
    assert not blocks[0][0].requires_grad and not blocks[1][0].requires_grad and blocks[2][0].requires_grad
    assert [start for start, _ in fresh.extras["freezes"]] == [8, 16]
    again.after_fit(fresh)
    with pytest.raises(ValueError, match="3 freeze fractions for a model of 2 blocks"):
        FreezeOut(blocks[:2], (0.1, 0.2, 0.3))


def test_runs_freeze_blocks_and_count_the_frozen_steps_flops(synthetic_dir):
    import speedrun
    from tests.conftest import TINY

    tiny = {**TINY, "model.widths": "8,16,16", "model.stem_train_frac": "0"}  # convnet: a frozen stem, two blocks
    never, half, first = (speedrun.train(data=synthetic_dir, store=None, stop_at_target=False,
                                         overrides={**tiny, "model.block_train_fracs": fracs})
                          for fracs in ("", "0.5,0.5", "0,0"))
    for result in (never, half, first):
        assert result.outcome in ("reached", "budget_exhausted"), result.detail
    assert never.best_accuracy > 0.5 and half.best_accuracy > 0.5
    assert all(p.requires_grad for p in half.model.parameters() if p.dim() > 1 and p is not
               half.model.body[0].weight)  # handed back after the fit (the whitened stem stays frozen)
    # frozen from the first batch, only the head trains: a step costs the forward and the head's gradient
    assert first.flops_per_image < half.flops_per_image < never.flops_per_image
    assert half.flops_per_image == pytest.approx((first.flops_per_image + never.flops_per_image) / 2, rel=0.02)


def test_layer_freezing_refuses_more_fractions_than_blocks_and_fractions_outside_0_1(capsys, synthetic_dir):
    from speedrun.cli import main

    for fracs, said in (("0.5,0.5,0.5", "gives 3 fractions, but the model has 1 block after its first layer"),
                        ("1.5", "model.block_train_fracs must be fractions in [0, 1]")):
        code = main(["train", "--data", str(synthetic_dir), "--store", str(synthetic_dir / "runs.sqlite"),
                     "--set", "model.widths=8,16", "--set", "model.pools=0,1",
                     "--set", f"model.block_train_fracs={fracs}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and said in err and len(err.splitlines()) == 1, err
