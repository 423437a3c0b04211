"""Precision and compilation: what CPU autocast does to batch norm, bf16 end to end, a missing compiler."""
import json
import shutil

import pytest
import torch

import speedrun
from speedrun.cli import main
from speedrun.env import compile_problem
from speedrun.models.convnet import global_max
from speedrun.recipes import get_recipe
from speedrun.techniques.compile import compile_model, compiled_graphs
from speedrun.techniques.precision import autocast_for
from tests.conftest import TINY

CPU = torch.device("cpu")


def test_cpu_autocast_keeps_batch_norm_statistics_in_fp32():
    """As documented in autocast_for: the conv runs in bf16; BN is on none of autocast's lists, so it takes
    the bf16 activations as they are, but its batch statistics, running stats and affine parameters are
    fp32, and only its output is rounded to bf16."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
    reference = torch.nn.BatchNorm2d(8)
    x = torch.randn(64, 3, 16, 16) * 3 + 5  # a large mean: where bf16 arithmetic would show
    with autocast_for("bf16", CPU)():
        h = conv(x)
        y = bn(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert bn.running_mean.dtype == bn.running_var.dtype == bn.weight.dtype == torch.float32
    expected = reference(h.float())  # fp32 batch norm of the very same (bf16-valued) activations
    # Statistics agree to fp32 rounding; bf16 arithmetic would be off by ~1e-2 at these magnitudes.
    assert torch.allclose(bn.running_mean, reference.running_mean, rtol=0, atol=1e-5)
    assert torch.allclose(bn.running_var, reference.running_var, rtol=1e-5, atol=1e-5)
    assert (h.float().mean((0, 2, 3)) - h.mean((0, 2, 3)).float()).abs().max() > 1e-3  # ... as here
    assert torch.allclose(y.float(), expected, rtol=2 ** -7, atol=2 ** -7)  # the output: bf16 rounding only
    y.float().sum().backward()
    assert bn.weight.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert autocast_for("fp32", CPU)() is not None and not torch.is_autocast_enabled("cpu")


def test_bf16_trains_end_to_end_on_cpu(synthetic_dir):
    r = speedrun.train("fashion-mnist", data=synthetic_dir, target=0.6, store=None,
                       overrides={**TINY, "train.precision": "bf16"})
    assert r.outcome == "reached", r.detail
    assert r.env["precision"] == "bf16" and r.flops_per_image > 0
    assert all(p.dtype == torch.float32 for p in r.model.parameters())  # autocast: fp32 master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_global_max_gets_finite_gradients_when_compiled_under_autocast(dtype):
    """Regression: with ``amax`` as the global pool, TorchInductor under bf16/fp16 autocast gave NaN
    gradients below the pool (cifar10-94 diverged at its first step on an H100; this graph, with
    ``amax``, reproduces it on the CPU). ``global_max``, which ConvNet and AirbenchNet use, must give the
    compiled backward the eager one's gradients, to low-precision rounding."""
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.MaxPool2d(2),
                                   torch.nn.BatchNorm2d(8), torch.nn.GELU())
        head = torch.nn.Linear(8, 10, bias=False)

        def net(x):
            return head(global_max(body(x)))

        with torch.autocast("cpu", dtype=dtype):
            out = (torch.compile(net) if compiled else net)(torch.randn(16, 3, 8, 8))
        out.float().sum().backward()
        grads.append(body[0].weight.grad)
    assert torch.isfinite(grads[1]).all()
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=0.02 * grads[0].abs().max().item())


def test_compile_without_a_compiler_fails_in_one_line_before_training(capsys, synthetic_dir, monkeypatch):
    from torch._inductor import config

    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)  # inductor's other way to get one
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    with config.patch({"cpp.cxx": (None, "no-such-c++-compiler")}):  # inductor's own compiler search fails
        assert "C++ compiler" in compile_problem(CPU) and "no-such-c++-compiler" in compile_problem(CPU)
        code = main(["train", "--data", str(synthetic_dir), *sets, "--set", "train.compile=true", "--json",
                         "--device", "cpu"])  # the C++ compiler matters on the CPU only
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.compile needs a C++ compiler" in err and len(err.splitlines()) == 1
    main(["runs", "--json"])
    assert json.loads(capsys.readouterr().out) == []  # refused before a run was recorded


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")
def test_compile_is_possible_where_gxx_exists():
    assert compile_problem(CPU) is None


def test_compile_covers_every_input_size_of_a_progressive_resizing_schedule(monkeypatch):
    """Dynamo falls back to eager, silently, past its recompile limit: a run that resizes must raise it."""
    import torch._dynamo

    imagenet = get_recipe("imagenet-resnet50")  # 128 -> 192 px in 4-px steps: 17 sizes
    assert compiled_graphs(imagenet, native=192) == 17 + 2  # + evaluation and its last partial batch
    assert compiled_graphs(get_recipe("fashion-mnist"), native=28) == 1 + 2 + 1  # + the stem freezing mid-run
    freezing = get_recipe("fashion-mnist").override({"model.block_train_fracs": (0.5, 0.5, 0.8, 1.0)})
    assert compiled_graphs(freezing, native=28) == 1 + 2 + 3  # the stem at 25%, two blocks at 50%, one at 80%
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    # dynamo's own patch, not monkeypatch's: pytest's undo deletes a config entry, breaking later compiles
    with torch._dynamo.config.patch(recompile_limit=8):
        compile_model(torch.nn.Identity(), imagenet, native=192)
        assert torch._dynamo.config.recompile_limit == 19 and calls == [{}]
        compile_model(torch.nn.Identity(), get_recipe("fashion-mnist"), native=28)
        assert torch._dynamo.config.recompile_limit == 19  # never lowered
