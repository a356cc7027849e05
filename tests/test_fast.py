"""The fast engine (scalr_zoo.fast) and the module's forward against the spec-literal forward
(scalr_zoo.literal) and the reference cases."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scalr_zoo
from scalr_zoo.fast import FastWaffleIron, _Workspace, fast_engine, plane_cells
from scalr_zoo.literal import literal_forward
from scalr_zoo.preprocess import pack_clouds, prepare_cloud

from conftest import assert_matches_reference, random_scan

FOV = [[-20, -20, -4], [20, 20, 4]]
GRIDS = [[64, 64], [64, 16], [64, 16]]


def _randomize(model: scalr_zoo.WaffleIron, seed: int) -> scalr_zoo.WaffleIron:
    """Random norm statistics, affines and LayerScales, so that every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
        for layer in [*model.waffleiron.spatial_mix, *model.waffleiron.channel_mix]:
            layer.scale.weight.copy_(0.5 * torch.randn(layer.scale.weight.shape, generator=gen))
    return model


def _model(norm="layernorm", act="relu", head="linear", width=32, depth=3, seed=0, **extra) -> scalr_zoo.WaffleIron:
    torch.manual_seed(seed)
    config = {"width": width, "depth": depth, "norm": norm, "act": act, "head": head, "fov": FOV, "grids": GRIDS}
    if head != "none":
        config["out"] = 7
    if head == "mlp":
        config["hidden"] = 24
    config.update(extra)
    return _randomize(scalr_zoo.create_model(config), seed)


def _packed(model: scalr_zoo.WaffleIron, clouds: list[np.ndarray]):
    cfg = model.config
    prepared = [prepare_cloud(torch.from_numpy(c), cfg.preprocess, cfg.arch.dim_proj) for c in clouds]
    return pack_clouds(prepared, cfg.preprocess.grids)[0]


def _literal(model, packed, head=False) -> torch.Tensor:
    return literal_forward(model, packed, head=head)


def _module(model, packed, head=False) -> torch.Tensor:
    with torch.no_grad():
        return model(packed, head=head)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The testvector tolerance: max |error| <= 1e-4 x RMS, per-point cosine >= 0.99999."""
    assert actual.dtype == torch.float32
    assert_matches_reference(actual, expected.detach().numpy())


def _edge_scan(seed: int) -> np.ndarray:
    """Points hugging the FOV borders, so that occupied cells sit on every edge of every grid."""
    rng = np.random.default_rng(seed)
    n = 1500
    xyz = rng.uniform(-19.9, 19.9, size=(n, 3)) * np.array([1, 1, 0.19])
    xyz[: n // 4, 0] = rng.uniform(19.5, 19.99, n // 4)
    xyz[n // 4 : n // 2, 1] = rng.uniform(-19.99, -19.5, n // 4)
    xyz[n // 2 : 3 * n // 4, 2] = rng.uniform(3.8, 3.99, n // 4)
    return np.column_stack([xyz, rng.random(n)]).astype(np.float32)


FAMILIES = [
    # norm, act, head, sparse CSR kernels (CPU default) or index kernels (the GPU default)
    ("layernorm", "relu", "linear", True),
    ("layernorm", "gelu", "mlp", False),
    ("batchnorm", "relu", "bn_linear", False),
    ("batchnorm", "gelu", "none", True),
    ("layernorm", "relu", "bn_linear", False),
    ("batchnorm", "relu", "mlp", True),
]


@pytest.mark.parametrize("norm,act,head,sparse", FAMILIES)
def test_fast_equals_literal_every_family(norm, act, head, sparse):
    model = _model(norm, act, head, depth=4, seed=len(norm) + len(act) + len(head))
    packed = _packed(model, [random_scan(2500, seed=3, extent=19.0), _edge_scan(4)])
    engine = FastWaffleIron(model, sparse_kernels=sparse)
    literal = _literal(model, packed)
    _close(engine(packed), literal)
    _close(_module(model, packed), literal)
    if head != "none":
        literal_head = _literal(model, packed, head=True)
        _close(engine(packed, head=True), literal_head)
        _close(_module(model, packed, head=True), literal_head)
    else:
        with pytest.raises(ValueError, match="no head"):
            engine(packed, head=True)


@pytest.mark.parametrize("sparse", [True, False])
def test_batch_of_clouds_equals_each_cloud_alone(sparse):
    """Clouds packed together never see each other, even where their cells touch the grid edges."""
    model = _model(width=48, depth=3, seed=5)
    clouds = [_edge_scan(1), random_scan(1800, seed=2, extent=19.0), _edge_scan(3)]
    engine = FastWaffleIron(model, sparse_kernels=sparse)
    packed = _packed(model, clouds)
    batched = engine(packed)
    _close(batched, _literal(model, packed))
    start = 0
    for cloud in clouds:
        alone = engine(_packed(model, [cloud]))
        torch.testing.assert_close(batched[start : start + len(alone)], alone, rtol=1e-5, atol=1e-5)
        start += len(alone)
    assert start == len(batched)


def test_reference_cases_every_path(case):
    """The original code's numbers, through the fast default, the module's forward and the literal path."""
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu")
    for impl in ("fast", "module", "literal"):
        assert_matches_reference(model.extract(case.points, impl=impl), case.arrays["backbone"])
        assert_matches_reference(model.extract(case.points, head=True, impl=impl), case.arrays["head"])


def test_index_kernels_match_reference_case(pretrained_case, pretrained_model):
    """The kernels the GPU uses by default, run on the CPU."""
    case, model = pretrained_case, pretrained_model
    packed = _packed(model, [case.points])
    engine = FastWaffleIron(model, sparse_kernels=False)
    cloud = prepare_cloud(torch.from_numpy(case.points), model.config.preprocess, model.config.arch.dim_proj)
    assert_matches_reference(engine(packed)[cloud.upsample], case.arrays["backbone"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_close_to_fp32(pretrained_case, pretrained_model, dtype):
    points = pretrained_case.points
    fp32 = pretrained_model.extract(points)
    low = pretrained_model.extract(points, dtype=dtype)
    assert low.dtype == torch.float32 and low.shape == fp32.shape
    cosine = F.cosine_similarity(low.double(), fp32.double(), dim=1)
    assert cosine.min() >= 0.999, cosine.min()
    assert not torch.equal(low, fp32)  # the products really ran in reduced precision
    assert fast_engine(pretrained_model, dtype).embed.pair_out.weight.dtype == dtype
    head = pretrained_model.extract(points, head=True, dtype=dtype)
    assert F.cosine_similarity(head.double(), pretrained_model.extract(points, head=True).double(), dim=1).min() >= 0.999


def test_engine_rebuilt_when_weights_change():
    a, b = _model(seed=1), _model(seed=2)
    points = random_scan(2000, seed=7, extent=19.0)
    first = a.extract(points)
    engine = fast_engine(a)
    assert fast_engine(a) is engine  # cached while nothing changes
    a.load_state_dict(b.state_dict())
    assert fast_engine(a) is not engine
    after_load = a.extract(points)
    assert not torch.allclose(after_load, first, atol=1e-3)
    _close(after_load, b.extract(points, impl="module"))
    with torch.no_grad():  # an in-place update (what an optimiser step does)
        a.waffleiron.channel_mix[1].mlp[2].weight.mul_(-2.0)
    _close(a.extract(points), a.extract(points, impl="module"))
    # a new head module: the old tensors are untouched, the structure changed
    a.classif = nn.Conv1d(32, 5, 1)
    head = a.extract(points, head=True)
    assert head.shape[1] == 5
    _close(head, a.extract(points, head=True, impl="module"))


def test_training_steps_then_fast_extract_follow_the_weights():
    model = _model(norm="batchnorm", seed=3)
    points = random_scan(2000, seed=8, extent=19.0)
    before = model.extract(points)
    packed = _packed(model, [points])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):  # the model's own forward trains; it updates weights and BN statistics
        optimizer.zero_grad()
        model(packed).square().mean().backward()
        optimizer.step()
    assert model.training
    after = model.extract(points)
    assert model.training  # extract() restores the mode it found
    assert not torch.allclose(after, before, atol=1e-3)
    _close(after, model.extract(points, impl="module"))


def test_engine_is_inference_only():
    model = _model(seed=4).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        FastWaffleIron(model)
    with pytest.raises(RuntimeError, match="eval mode"):
        fast_engine(model)
    engine = fast_engine(model.eval())
    with torch.enable_grad():
        out = engine(_packed(model, [random_scan(1500, seed=1, extent=19.0)]))
    assert not out.requires_grad


def test_extract_rejects_unknown_impl(pretrained_case, pretrained_model):
    with pytest.raises(ValueError, match="impl must be"):
        pretrained_model.extract(pretrained_case.points, impl="turbo")


def test_normalize_keeps_precision_for_rows_with_a_large_mean():
    """Rows whose mean dwarfs their spread take the exact variance, not the one-pass formula."""
    engine = FastWaffleIron(_model(width=64, seed=6))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(300, 64, generator=gen)
    tokens[::3] += 3000.0  # mean / std ~ 3000: the one-pass formulas would be off by ~1e-1
    out = engine._normalize(tokens, torch.empty_like(tokens))
    expected = F.layer_norm(tokens.double(), (64,), eps=engine.eps)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sparse", [True, False])
def test_spatial_mix_with_large_mean_rows(sparse):
    """Rows whose mean dwarfs their spread are normalised exactly (here more exactly than the float32 literal)."""
    model = _model(width=32, seed=9)
    packed = _packed(model, [random_scan(2000, seed=5, extent=19.0)])
    engine = FastWaffleIron(model, sparse_kernels=sparse)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(packed.features.shape[0], 32, generator=gen)
    tokens[::5] += 3e4
    cells = plane_cells(packed.cell_index[0], packed.grids[0], sparse_kernels=sparse)
    fast = tokens.clone()
    engine._spatial_mix(fast, engine.spatial[0], cells, _Workspace(fast.device))
    with torch.no_grad():  # the literal layer in float64 as the truth
        layer = copy.deepcopy(model.waffleiron.spatial_mix[0]).double()
        truth = layer(tokens.double(), packed.cell_index[0], packed.grids[0], 1) - tokens.double()
    plain = torch.ones(len(tokens), dtype=torch.bool)
    plain[::5] = False  # the others' updates are rounded at the 3e4 scale of their tokens
    _close((fast - tokens)[plain], truth[plain].float())


def test_plane_cells_tables():
    """Tap tables of a tiny 4x3 grid, two clouds, checked against a dense construction."""
    rows, cols = 4, 3
    cells = torch.tensor([0, 0, 5, 11, 12 + 3, 12 + 3, 12 + 8])  # cloud 0: (0,0), (1,2), (3,2); cloud 1: (1,0), (2,2)
    tables = plane_cells(cells, (rows, cols), sparse_kernels=True)
    occupied = sorted(set(cells.tolist()))
    assert tables.num_occupied == len(occupied)
    assert tables.inverse.tolist() == [occupied.index(c) for c in cells.tolist()]
    assert torch.allclose(tables.inv_count.view(-1), torch.tensor([0.5, 1, 1, 0.5, 1]))

    def taps(cell):
        cloud, local = divmod(cell, rows * cols)
        r, c = divmod(local, cols)
        out = []
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                inside = 0 <= rr < rows and 0 <= cc < cols
                out.append(cloud * rows * cols + rr * cols + cc if inside else None)
        return out

    dilated = sorted({t for o in occupied for t in taps(o) if t is not None})
    assert tables.num_dilated == len(dilated)
    for u, cell in enumerate(dilated):
        expected = [occupied.index(t) if t in occupied else len(occupied) for t in taps(cell)]
        assert tables.conv1_taps[u].tolist() == expected
    for o, cell in enumerate(occupied):
        expected = [dilated.index(t) if t is not None else len(dilated) for t in taps(cell)]
        assert tables.conv2_taps[o].tolist() == expected
    dense_conv1 = torch.zeros(len(dilated), 9 * len(occupied))
    for u in range(len(dilated)):
        for k, o in enumerate(tables.conv1_taps[u].tolist()):
            if o < len(occupied):
                dense_conv1[u, k * len(occupied) + o] = 1
    assert torch.equal(tables.conv1_matrix.to_dense(), dense_conv1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fast_path_matches_and_stays_on_device(pretrained_case):
    case = pretrained_case
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cuda")
    points = torch.from_numpy(case.points).cuda()
    feats = model.extract(points)
    assert feats.device.type == "cuda"
    assert_matches_reference(feats, case.arrays["backbone"])
    assert_matches_reference(model.extract(points, head=True), case.arrays["head"])
    for dtype in (torch.bfloat16, torch.float16):
        low = model.extract(points, dtype=dtype)
        assert F.cosine_similarity(low.double(), feats.double(), dim=1).min() >= 0.999
    tables = plane_cells(torch.tensor([0, 1, 5], device="cuda"), (4, 4), sparse_kernels=False)
    assert tables.conv1_taps.device.type == "cuda" and tables.inv_count.device.type == "cuda"
