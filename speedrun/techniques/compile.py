"""``torch.compile`` of the training model, with dynamo's recompile limit sized to the run's shapes."""
from __future__ import annotations

from torch import nn

from speedrun.config import Recipe
from speedrun.techniques.resizing import progressive_sizes


def compiled_graphs(recipe: Recipe, native: int) -> int:
    """How many graphs torch.compile builds for a run: one per training image size (progressive
    resizing visits several), one for evaluation (no autograd) and one for its last, smaller batch,
    and one more for each freeze mid-run (fewer inputs need a gradient)."""
    d = recipe.data
    sizes = progressive_sizes(native=native, start_scale=d.resize_start_scale, full_frac=d.resize_full_frac)
    freezes = [f for f in (recipe.model.stem_train_frac, *recipe.model.block_train_fracs) if 0 < f < 1]
    return len(sizes) + 2 + len(set(freezes))


def compile_model(model: nn.Module, recipe: Recipe, *, native: int) -> nn.Module:
    """``torch.compile`` with dynamo's recompile limit raised to cover every input shape of the run.

    Dynamo recompiles on a new input shape and, past its recompile limit (8 by default), silently runs
    the model eagerly from then on. Whether a new size gets a static graph of its own or turns the graph
    dynamic depends on the torch version (2.13 on a CPU compiled each size statically; 2.11 on a GPU went
    dynamic), so the limit is raised to the worst case, one graph per shape (``compiled_graphs``): a
    ResNet-50 resized from 64 to 128 px in 4-px steps meets 17 sizes.
    """
    import torch
    import torch._dynamo

    limit = compiled_graphs(recipe, native)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    return torch.compile(model)
