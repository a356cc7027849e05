"""The AMX bfloat16 kernel (scalr_zoo._amx) against torch, and its place in the fast engine.

Tests that run the kernel need an x86 CPU that advertises AMX and a C
compiler; they are skipped elsewhere, like the CUDA tests without a GPU. Where
both are present the kernel must build and pass its self-test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalr_zoo import _amx
from scalr_zoo.fast import FastWaffleIron
from scalr_zoo.literal import literal_forward

from test_fast import _model, _packed, _edge_scan
from conftest import random_scan

AMX_MACHINE = _amx.amx_cpu() and _amx._compiler() is not None
KERNEL = _amx.load_amx_kernel() if AMX_MACHINE else None
requires_amx = pytest.mark.skipif(not AMX_MACHINE, reason="needs an x86 CPU with AMX and a C compiler")


def _assert_one_bf16_rounding(actual: torch.Tensor, exact: torch.Tensor) -> None:
    """``actual`` (bf16) is ``exact`` (float64) rounded once to bf16, up to float32 round-off:
    within one bf16 spacing, plus 1e-5 for values near 0 that float32 cancellation reaches."""
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)
    error = (actual.double() - exact).abs()
    assert (error <= spacing + 1e-5).all(), (error / (spacing + 1e-5)).max()


def test_pack_weight_layout():
    weight = torch.randn(64, 96).to(torch.bfloat16)
    packed = _amx.pack_weight(weight)
    assert packed.shape == (4, 3, 16, 16, 2) and packed.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, k, r, c, p = (int(torch.randint(s, (1,), generator=gen)) for s in packed.shape)
        assert packed[n, k, r, c, p] == weight[16 * n + c, 32 * k + 2 * r + p]
    with pytest.raises(ValueError, match="multiples of 32"):
        _amx.pack_weight(torch.randn(48, 64))


@requires_amx
def test_kernel_builds_and_passes_its_self_test():
    assert KERNEL is not None
    assert KERNEL.self_test()


@requires_amx
@pytest.mark.parametrize("rows", [1, 31, 32, 33, 1000])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_matches_torch(rows, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
        weight = torch.randn(64, 96, generator=gen)
        bias = torch.randn(64, generator=gen)
        packed = _amx.pack_weight(weight)
        exact = x.double() @ weight.to(torch.bfloat16).double().t() + bias.double()
        stored = KERNEL.linear(x, packed, bias, torch.empty(rows, 64, dtype=torch.bfloat16))
        _assert_one_bf16_rounding(stored, exact)  # float32 sum, rounded once to bf16
        relu = KERNEL.linear(x, packed, bias, torch.empty(rows, 64, dtype=torch.bfloat16), relu=True)
        assert torch.equal(relu, stored.relu())
        start = torch.randn(rows, 64, generator=gen)
        added = KERNEL.linear(x, packed, bias, start.clone(), accumulate=True)
        torch.testing.assert_close(added.double(), start.double() + exact, rtol=1e-5, atol=1e-4)
        no_bias = KERNEL.linear(x, packed, None, torch.zeros(rows, 64), accumulate=True)
        torch.testing.assert_close(no_bias.double(), exact - bias.double(), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(previous)


@requires_amx
@pytest.mark.parametrize("threads", [1, 2])
def test_layernorm_matches_float64(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        rows = torch.randn(301, 96, generator=gen) * (1 + 4 * torch.rand(301, 1, generator=gen))
        rows[::7] += 3e4  # a mean that dwarfs the spread: the one-pass formula would cancel here
        out = KERNEL.layernorm(rows, 1e-5, torch.empty(301, 96, dtype=torch.bfloat16))
        exact = F.layer_norm(rows.double(), (96,), eps=1e-5)
        _assert_one_bf16_rounding(out, exact)
        with pytest.raises(ValueError, match="bad shapes"):
            KERNEL.layernorm(rows.double(), 1e-5, out)
        with pytest.raises(ValueError, match="bad shapes"):
            KERNEL.layernorm(rows[:, :90].contiguous(), 1e-5, torch.empty(301, 90, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(previous)


@requires_amx
def test_linear_rejects_bad_arguments():
    x = torch.randn(40, 64).to(torch.bfloat16)
    packed = _amx.pack_weight(torch.randn(32, 64))
    out = torch.empty(40, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bad shapes"):
        KERNEL.linear(x.float(), packed, None, out)  # float32 rows
    with pytest.raises(ValueError, match="bad shapes"):
        KERNEL.linear(x.t().contiguous().t(), packed, None, out)  # not contiguous
    with pytest.raises(ValueError, match="bad shapes"):
        KERNEL.linear(x, packed, None, out, accumulate=True)  # accumulating into bf16
    with pytest.raises(ValueError, match="bad shapes"):
        KERNEL.linear(x[:, :32].contiguous(), packed, None, out)  # K does not match the weight


@requires_amx
@pytest.mark.parametrize("norm,act,head", [("layernorm", "relu", "linear"), ("batchnorm", "gelu", "mlp")])
def test_engine_on_the_kernel_matches_torch_bf16_and_fp32(norm, act, head):
    model = _model(norm, act, head, width=64, depth=3, seed=11, hidden=32)
    packed = _packed(model, [random_scan(2500, seed=3, extent=19.0), _edge_scan(4)])
    on_kernel = FastWaffleIron(model, torch.bfloat16, use_amx_kernel=True)
    on_torch = FastWaffleIron(model, torch.bfloat16, use_amx_kernel=False)
    assert on_kernel.channel[0].hidden.packed is not None and on_kernel.embed.final.packed is not None
    assert on_torch.channel[0].hidden.packed is None
    exact = literal_forward(model, packed)
    for out in (on_kernel(packed), on_torch(packed)):
        assert F.cosine_similarity(out.double(), exact.double(), dim=1).min() >= 0.999
    assert not torch.equal(on_kernel(packed), on_torch(packed))  # really two different product paths
    heads = [engine(packed, head=True) for engine in (on_kernel, on_torch)]
    exact_head = literal_forward(model, packed, head=True)
    for out in heads:
        assert F.cosine_similarity(out.double(), exact_head.double(), dim=1).min() >= 0.999


@requires_amx
def test_build_is_cached_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALR_ZOO_CACHE", str(tmp_path))
    kernel = _amx.load_amx_kernel()
    assert kernel is not None
    libraries = list((tmp_path / "kernels").glob("amx_linear-*.so"))
    assert len(libraries) == 1
    assert libraries[0].with_name(libraries[0].name + ".verdict").read_text() == "ok"
    assert not list((tmp_path / "kernels").glob("*.tmp"))
    assert _amx.load_amx_kernel() is kernel


@requires_amx
def test_no_working_compiler_falls_back_to_torch(tmp_path, monkeypatch):
    # a compiler that writes part of its output, then fails
    compiler = tmp_path / "broken-cc"
    compiler.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo broken-cc 1.0; exit 0; }\n'
        'while [ $# -gt 0 ]; do [ "$1" = -o ] && printf partial > "$2"; shift; done\nexit 1\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("SCALR_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("SCALR_ZOO_AMX_KERNEL", "1")
    assert _amx.amx_kernel() is None
    assert not list((tmp_path / "cache" / "kernels").glob("*"))  # nothing half-written
    model = _model(width=64, seed=2)
    engine = FastWaffleIron(model, torch.bfloat16)
    assert engine.amx is None and engine.channel[0].hidden.packed is None
    with pytest.raises(RuntimeError, match="AMX kernel is not available"):
        FastWaffleIron(model, torch.bfloat16, use_amx_kernel=True)


@requires_amx
def test_switches(monkeypatch):
    monkeypatch.setenv("SCALR_ZOO_AMX_KERNEL", "0")
    assert _amx.amx_kernel() is None
    monkeypatch.setenv("SCALR_ZOO_AMX_KERNEL", "1")
    assert _amx.amx_kernel() is KERNEL
    monkeypatch.setenv("SCALR_ZOO_AMX_KERNEL", "auto")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # oneDNN may use AMX itself
    assert _amx.amx_kernel() is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert _amx.amx_kernel() is KERNEL
