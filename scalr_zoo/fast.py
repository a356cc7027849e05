"""Fast inference engine for WaffleIron networks.

:class:`FastWaffleIron` computes the same function as ``WaffleIron.forward``
in eval mode (up to float rounding) with less work and memory:

* **Folded weights.** Every eval-mode norm affine (LayerNorm gamma/beta,
  BatchNorm running statistics) and every LayerScale is folded into the
  neighbouring linear layer or depthwise convolution, in float64, once.
  The embedding's BN1d -> conv1 -> final branch collapses to one 5 -> C map;
  its BN2d(5) -> Conv(5->C) -> BN2d(C) prefix (affine, so it commutes with
  the neighbour difference) to one 5 -> C map applied to the differences of
  the 5 raw features. (Mapping every point first and differencing C-wide
  rows would move as much memory and lose precision: coordinates of tens of
  metres against neighbour offsets of centimetres.)
* **Sparse spatial mixing.** The literal path fills a dense ``(B, C, H, W)``
  grid per layer. The convolution output is read only at occupied cells, so
  the second 3x3 conv is evaluated only there and the first one only on the
  3x3 neighbourhood of occupied cells, gathering the taps through index
  tables built once per projection plane and forward pass (the same tables
  serve every layer of that plane). Empty cells hold 0, grid borders are
  zero padding and clouds of a packed batch never see each other, exactly
  as in the dense grid.
* **Point-major buffers, reused.** Tokens stay ``(M, C)``; the per-layer
  intermediates live in a few buffers allocated once per forward pass and
  written with ``out=`` / in-place ops (fresh 50-200 MB allocations cost
  page faults on every layer).
* **Cheap row statistics.** On the CPU, LayerNorm statistics come from one
  mean and one sum-of-squares reduction (several times faster than the
  LayerNorm kernel there); rows whose mean is large against their spread,
  where that formula would lose precision, are normalised in float64. Before
  a spatial mix the normalisation is folded into the sparse cell-averaging
  matrix, so no normalised copy of the tokens is written.
* **Reduced precision.** With ``dtype=torch.bfloat16`` (or float16) the
  matrix products run in that dtype while the residual stream, the norm
  statistics and the spatial mixing stay float32 (autocast would run the
  depthwise convolutions in reduced precision too). On CPUs with AMX that
  oneDNN cannot use (see :mod:`scalr_zoo._amx`) the bfloat16 products run
  on our own AMX kernel, which also adds the second product of each channel
  mix to the float32 tokens straight from its float32 accumulators.

``torch.compile`` is not used: fusing the cell convolutions with it saved
about 35 ms per layer of WI-48-768 on a 2-core CPU (a few per cent of a
scan) but took about 40 s to compile. The matrix products dominate: the
engine runs within about 1.3x of the time of the products alone.

The engine is for inference only: it holds folded *copies* of the weights
(no gradients flow to the model) and uses BatchNorm running statistics. Use
:func:`fast_engine` to get the engine of a model; it is cached and rebuilt
automatically when any parameter or buffer of the model changes (in-place
updates included).
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._amx import BLOCK as AMX_BLOCK
from ._amx import AmxKernels, amx_kernel, pack_weight
from .model import PackedInput, WaffleIron

__all__ = ["FastWaffleIron", "fast_engine"]

logger = logging.getLogger(__name__)

#: Points per chunk of the embedding's (points * K, C) neighbour branch, per device type.
EMBED_CHUNK_POINTS = {"cpu": 1024}
EMBED_CHUNK_POINTS_DEFAULT = 8192
#: Rows whose squared mean exceeds this multiple of their variance are
#: normalised in float64 (the one-pass formulas lose precision there).
ILL_CONDITIONED_RATIO = 8.0

#: The 3x3 taps in the order of a flattened (3, 3) kernel: (row offset, col offset).
_TAPS = tuple((i - 1, j - 1) for i in range(3) for j in range(3))


# --------------------------------------------------------------------------- folding


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` (float64 vectors)."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine part of a LayerNorm (gamma, beta) or an eval BatchNorm (scale, shift), float64."""
    if isinstance(norm, nn.LayerNorm):
        return norm.weight.detach().double(), norm.bias.detach().double()
    return _bn_affine(norm)


def _matrix(conv: nn.Conv1d | nn.Conv2d) -> torch.Tensor:
    """Kernel-size-1 convolution weight as a float64 ``(out, in)`` matrix."""
    return conv.weight.detach().double().flatten(1)


def _bias(conv: nn.Module, width: int, device: torch.device) -> torch.Tensor:
    bias = getattr(conv, "bias", None)
    return bias.detach().double() if bias is not None else torch.zeros(width, dtype=torch.float64, device=device)


def _depthwise_taps(conv: nn.Conv2d) -> torch.Tensor:
    """Depthwise 3x3 weight ``(C, 1, 3, 3)`` as float64 ``(9, C)`` in :data:`_TAPS` order."""
    return conv.weight.detach().double().flatten(1).t().contiguous()


@dataclass
class _Linear:
    """A folded linear layer ``x @ weight.T + bias``, stored contiguous in its compute dtype.

    With the AMX kernel the weight is held only in its packed layout and the
    bias in float32 (the kernel adds it to its float32 accumulators).
    """

    weight: torch.Tensor | None  # (out, in), None when packed
    bias: torch.Tensor | None  # (out,)
    packed: torch.Tensor | None = None  # scalr_zoo._amx.pack_weight(weight)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] if self.weight is not None else self.packed.shape[0] * 16

    @classmethod
    def of(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, amx: AmxKernels | None = None
    ) -> "_Linear":
        if amx is not None and weight.shape[0] % AMX_BLOCK == 0 and weight.shape[1] % AMX_BLOCK == 0:
            bias32 = None if bias is None else bias.to(torch.float32).contiguous()
            return cls(None, bias32, pack_weight(weight))
        return cls(weight.to(dtype).contiguous(), None if bias is None else bias.to(dtype).contiguous())


@dataclass
class _FoldedEmbedding:
    point: _Linear  # (C, 5) float32: BN1d -> conv1 -> final[:, :C], on raw features
    pair: torch.Tensor  # (C, 6) compute dtype: BN2d(5) -> Conv(5->C) -> BN2d(C) on (difference, 1)
    pair_out: _Linear  # (C, C) Conv(C->C) after the ReLU, no bias
    final: _Linear  # (C, C) final[:, C:], no bias


@dataclass
class _FoldedChannelMix:
    layernorm: bool  # normalise rows first (LayerNorm); BatchNorm is folded entirely
    hidden: _Linear  # norm affine folded into W1
    out: _Linear  # LayerScale folded into W2


@dataclass
class _FoldedSpatialMix:
    layernorm: bool
    scale: torch.Tensor  # (C,) float32 norm affine, applied to the cell means
    shift: torch.Tensor  # (C,)
    conv1: torch.Tensor  # (9, C) float32
    bias1: torch.Tensor  # (C,)
    conv2: torch.Tensor  # (9, C) float32, LayerScale folded in
    bias2: torch.Tensor  # (C,)


def _fold_embedding(embed: nn.Module, dtype: torch.dtype, amx: AmxKernels | None) -> _FoldedEmbedding:
    a0, b0 = _bn_affine(embed.norm)
    width = embed.conv1.weight.shape[0]
    device = embed.conv1.weight.device
    w_point, b_point = _matrix(embed.conv1), _bias(embed.conv1, width, device)
    w_final = _matrix(embed.final)
    w_final_point, w_final_pair = w_final[:, :width], w_final[:, width:]
    point_w = w_final_point @ w_point * a0
    point_b = w_final_point @ (w_point @ b0 + b_point) + _bias(embed.final, width, device)
    bn_in, conv_a, bn_mid, _relu, conv_b = embed.conv2
    a_in, b_in = _bn_affine(bn_in)
    s_mid, t_mid = _bn_affine(bn_mid)
    w_a = _matrix(conv_a)
    pair_w = s_mid[:, None] * w_a * (a_in * a0)
    pair_b = s_mid * (w_a @ b_in) + t_mid
    return _FoldedEmbedding(
        point=_Linear.of(point_w, point_b, torch.float32),
        pair=torch.cat([pair_w, pair_b[:, None]], dim=1).to(dtype).contiguous(),
        pair_out=_Linear.of(_matrix(conv_b), None, dtype, amx),
        final=_Linear.of(w_final_pair, None, dtype, amx),
    )


def _fold_channel_mix(mix: nn.Module, dtype: torch.dtype, amx: AmxKernels | None) -> _FoldedChannelMix:
    scale, shift = _norm_affine(mix.norm)
    w1, w2 = _matrix(mix.mlp[0]), _matrix(mix.mlp[2])
    b1, b2 = mix.mlp[0].bias.detach().double(), mix.mlp[2].bias.detach().double()
    layer_scale = mix.scale.weight.detach().double().view(-1)
    return _FoldedChannelMix(
        layernorm=isinstance(mix.norm, nn.LayerNorm),
        hidden=_Linear.of(w1 * scale, w1 @ shift + b1, dtype, amx),
        out=_Linear.of(layer_scale[:, None] * w2, layer_scale * b2, dtype, amx),
    )


def _fold_spatial_mix(mix: nn.Module) -> _FoldedSpatialMix:
    scale, shift = _norm_affine(mix.norm)
    conv1, conv2 = mix.ffn[0], mix.ffn[2]
    layer_scale = mix.scale.weight.detach().double().view(-1)
    f32 = torch.float32
    device = conv1.weight.device
    return _FoldedSpatialMix(
        layernorm=isinstance(mix.norm, nn.LayerNorm),
        scale=scale.to(device, f32),
        shift=shift.to(device, f32),
        conv1=_depthwise_taps(conv1).to(f32),
        bias1=conv1.bias.detach().to(f32),
        conv2=(_depthwise_taps(conv2) * layer_scale).to(f32),
        bias2=(conv2.bias.detach().double() * layer_scale).to(f32),
    )


def _fold_head(head: nn.Module, dtype: torch.dtype) -> list[_Linear | str]:
    """The head as a list of linear layers and ``"relu"`` markers."""
    if isinstance(head, nn.Conv1d):
        return [_Linear.of(_matrix(head), _bias(head, head.out_channels, head.weight.device), dtype)]
    layers: list[_Linear | str] = []
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    for layer in head:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            pending = _bn_affine(layer)
        elif isinstance(layer, nn.Conv1d):
            weight, bias = _matrix(layer), _bias(layer, layer.out_channels, layer.weight.device)
            if pending is not None:
                scale, shift = pending
                weight, bias = weight * scale, weight @ shift + bias
                pending = None
            layers.append(_Linear.of(weight, bias, dtype))
        elif isinstance(layer, nn.ReLU):
            layers.append("relu")
        else:  # pragma: no cover - build_head makes nothing else
            raise TypeError(f"unsupported head layer {type(layer).__name__}")
    return layers


# --------------------------------------------------------------------------- cell tables


@dataclass
class _PlaneCells:
    """Occupied cells of one projection plane of a packed batch and their 3x3 tap tables.

    O occupied cells, U cells within the 3x3 neighbourhood of an occupied
    cell (occupied ones included), M points.

    Attributes:
        inverse: ``(M,)`` occupied-cell row of every point.
        inv_count: ``(O, 1)`` float32, 1 / points per occupied cell.
        conv1_taps: ``(U, 9)`` occupied-cell row read by each tap of each
            dilated cell, or O (a zero row) for empty cells and the border.
        conv2_taps: ``(O, 9)`` dilated-cell row read by each tap of each
            occupied cell, or U (a zero row) outside the grid.
        mean_matrix: sparse CSR ``(O, M)`` averaging points into cells (sparse
            kernels only); its values are rewritten per layer.
        mean_order: ``(M,)`` point of each stored value of ``mean_matrix``.
        mean_weights: ``(M,)`` 1 / points in the cell, per stored value.
        conv1_matrix: sparse CSR ``(U, 9 O)`` selecting the non-empty taps
            from the 9 stacked tap-scaled copies of the cell means (sparse kernels only).
        read_matrix: sparse CSR ``(M, O)`` copying each cell back to its points (sparse kernels only).
    """

    inverse: torch.Tensor
    inv_count: torch.Tensor
    conv1_taps: torch.Tensor
    conv2_taps: torch.Tensor
    mean_matrix: torch.Tensor | None
    mean_order: torch.Tensor | None
    mean_weights: torch.Tensor | None
    conv1_matrix: torch.Tensor | None
    read_matrix: torch.Tensor | None

    @property
    def num_occupied(self) -> int:
        return int(self.inv_count.shape[0])

    @property
    def num_dilated(self) -> int:
        return int(self.conv1_taps.shape[0])


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _neighbours(cells: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cells ``(X,)`` -> their 9 tap cells ``(X, 9)`` and whether each lies inside its cloud's grid."""
    per_cloud = rows * cols
    cloud, local = cells // per_cloud, cells % per_cloud
    r, c = local // cols, local % cols
    offsets = torch.tensor(_TAPS, device=cells.device)
    nr = r[:, None] + offsets[:, 0]
    nc = c[:, None] + offsets[:, 1]
    inside = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols)
    return cloud[:, None] * per_cloud + nr * cols + nc, inside


def _lookup(sorted_cells: torch.Tensor, queries: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row of each query in ``sorted_cells``, or ``len(sorted_cells)`` where absent or not valid."""
    n = sorted_cells.numel()
    pos = torch.searchsorted(sorted_cells, queries).clamp_(max=n - 1)
    found = valid & (sorted_cells[pos] == queries)
    return torch.where(found, pos, torch.full_like(pos, n))


def plane_cells(cells: torch.Tensor, grid: tuple[int, int], sparse_kernels: bool) -> _PlaneCells:
    """Build the cell tables of one plane from the ``(M,)`` flat cell of every point."""
    rows, cols = grid
    occupied, inverse, counts = torch.unique(cells, sorted=True, return_inverse=True, return_counts=True)
    num_occupied = occupied.numel()
    taps_of_occupied, inside = _neighbours(occupied, rows, cols)
    dilated = torch.unique(taps_of_occupied[inside], sorted=True)
    conv2_taps = _lookup(dilated, taps_of_occupied, inside)
    taps_of_dilated, inside_dilated = _neighbours(dilated, rows, cols)
    conv1_taps = _lookup(occupied, taps_of_dilated, inside_dilated)
    inv_count = counts.to(torch.float32).reciprocal_().unsqueeze(1)
    mean_matrix = mean_order = mean_weights = conv1_matrix = read_matrix = None
    if sparse_kernels:
        m = cells.numel()
        device = cells.device
        mean_order = torch.argsort(inverse, stable=True)
        mean_weights = inv_count[inverse[mean_order], 0]
        crow = torch.zeros(num_occupied + 1, dtype=torch.long, device=device)
        torch.cumsum(counts, 0, out=crow[1:])
        mean_matrix = _csr(crow, mean_order, mean_weights.clone(), (num_occupied, m))
        hit = conv1_taps < num_occupied
        tap_index = torch.arange(9, device=device).expand_as(conv1_taps)
        crow1 = torch.zeros(dilated.numel() + 1, dtype=torch.long, device=device)
        torch.cumsum(hit.sum(1), 0, out=crow1[1:])
        col1 = (tap_index * num_occupied + conv1_taps)[hit]
        conv1_matrix = _csr(crow1, col1, torch.ones(col1.numel(), device=device), (dilated.numel(), 9 * num_occupied))
        read_matrix = _csr(torch.arange(m + 1, device=device), inverse, torch.ones(m, device=device), (m, num_occupied))
    return _PlaneCells(
        inverse, inv_count, conv1_taps, conv2_taps, mean_matrix, mean_order, mean_weights, conv1_matrix, read_matrix
    )


# --------------------------------------------------------------------------- engine


class _Workspace:
    """Buffers of one forward pass, allocated on first use and reused by every layer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A ``shape`` view of buffer ``(name, dtype)``, grown when too small (contents are not kept)."""
        numel = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[(name, dtype)] = buf
        return buf[:numel].view(shape)

    def release(self, *names: str) -> None:
        """Drop the buffers called ``names`` (any dtype)."""
        for key in [k for k in self._buffers if k[0] in names]:
            del self._buffers[key]


def _activation_(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.relu_ if kind == "relu" else torch._C._nn.gelu_


class FastWaffleIron:
    """Inference-only fast version of a :class:`~scalr_zoo.model.WaffleIron` (see module docstring).

    Args:
        model: the network, in eval mode; its weights are folded into copies.
        dtype: compute dtype of the matrix products, ``None``/float32,
            ``torch.bfloat16`` or ``torch.float16``.
        sparse_kernels: average points into cells, run the first conv and
            read cells back with sparse CSR products and run the second conv
            one tap at a time through a reused buffer (default on the CPU:
            least memory traffic); else use index_add / gathers of all taps
            at once (default elsewhere: fewest kernel launches).
        use_amx_kernel: run the bfloat16 products on :mod:`scalr_zoo._amx`'s
            kernel: None (default) where that module says so, True to
            require it (RuntimeError where it is unavailable), False never.

    Call it on a :class:`~scalr_zoo.model.PackedInput` like the model:
    ``engine(packed, head=False)`` -> float32 ``(M, C)`` or ``(M, out)``.
    """

    def __init__(
        self,
        model: WaffleIron,
        dtype: torch.dtype | None = None,
        *,
        sparse_kernels: bool | None = None,
        use_amx_kernel: bool | None = None,
    ) -> None:
        if model.training:
            raise RuntimeError(
                "FastWaffleIron is for inference and needs the model in eval mode (call model.eval()); "
                "train with the model's own forward"
            )
        self.config = model.config
        self.device = model.device
        self.dtype = dtype or torch.float32
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.sparse_kernels = self.device.type == "cpu" if sparse_kernels is None else sparse_kernels
        cpu_bf16 = self.device.type == "cpu" and self.dtype == torch.bfloat16
        self.amx = amx_kernel() if cpu_bf16 and use_amx_kernel is not False else None
        if use_amx_kernel and self.amx is None:
            raise RuntimeError(
                "the AMX kernel is not available here (it needs bfloat16 on an x86 CPU with AMX, "
                "a C compiler, and SCALR_ZOO_AMX_KERNEL unset or 1); see scalr_zoo._amx"
            )
        arch = self.config.arch
        self.act = arch.act
        self.eps = arch.layer_norm_eps
        self.dim_proj = arch.dim_proj
        with torch.no_grad():
            self.embed = _fold_embedding(model.embed, self.dtype, self.amx)
            self.spatial = [_fold_spatial_mix(m) for m in model.waffleiron.spatial_mix]
            self.channel = [_fold_channel_mix(m, self.dtype, self.amx) for m in model.waffleiron.channel_mix]
            self.head = _fold_head(model.classif, self.dtype) if model.has_head else None

    @property
    def has_head(self) -> bool:
        return self.head is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the folded weights."""
        tensors: list[torch.Tensor] = []
        for part in [self.embed, *self.spatial, *self.channel, *(self.head or [])]:
            if isinstance(part, str):
                continue
            for value in vars(part).values():
                values = vars(value).values() if isinstance(value, _Linear) else [value]
                tensors += [v for v in values if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ forward

    def __call__(self, packed: PackedInput, head: bool = False) -> torch.Tensor:
        """Backbone tokens ``(M, C)`` or, with ``head=True``, head outputs ``(M, out)``; float32."""
        if head and self.head is None:
            raise ValueError("this model has no head (head='none'); use head=False for backbone features")
        with torch.no_grad():
            work = _Workspace(self.device)
            tokens = self._embed(packed.features.to(self.device), packed.neighbors.to(self.device), work)
            planes: dict[int, _PlaneCells] = {}
            for depth, (spatial, channel) in enumerate(zip(self.spatial, self.channel)):
                plane = depth % len(self.dim_proj)
                if plane not in planes:
                    planes[plane] = plane_cells(
                        packed.cell_index[plane].to(self.device), packed.grids[plane], self.sparse_kernels
                    )
                self._spatial_mix(tokens, spatial, planes[plane], work)
                self._channel_mix(tokens, channel, work)
            return self._head(tokens) if head else tokens

    def _embed(self, features: torch.Tensor, neighbors: torch.Tensor, work: _Workspace) -> torch.Tensor:
        """``(M, 5)`` features and ``(M, K+1)`` neighbours -> float32 ``(M, C)`` tokens."""
        fold = self.embed
        m = features.shape[0]
        width = fold.point.weight.shape[0]
        features = features.float()
        others = neighbors[:, 1:]
        k = others.shape[1]
        tokens = torch.empty(m, width, device=self.device)
        torch.addmm(fold.point.bias, features, fold.point.weight.t(), out=tokens)
        pooled = work.get("hidden", (m, width), self.dtype)
        chunk = EMBED_CHUNK_POINTS.get(self.device.type, EMBED_CHUNK_POINTS_DEFAULT)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            rows = (stop - start) * k
            # feature differences with a column of ones that carries the bias
            diff = work.get("diff", (stop - start, k, 6), self.dtype)
            diff[..., 5] = 1
            torch.sub(features[others[start:stop]], features[start:stop, None], out=diff[..., :5])
            pair = work.get("pair", (rows, width), self.dtype)
            torch.mm(diff.view(rows, 6), fold.pair.t(), out=pair).relu_()
            mapped = self._linear(pair, fold.pair_out, work.get("pair_out", (rows, width), self.dtype))
            torch.amax(mapped.view(stop - start, k, width), dim=1, out=pooled[start:stop])
        work.release("diff", "pair", "pair_out")
        self._add_product(tokens, pooled, fold.final, work)
        return tokens

    def _linear(self, x: torch.Tensor, layer: _Linear, out: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """``out = [relu](x @ weight.T + bias)``, all in the compute dtype."""
        if layer.packed is not None:
            return self.amx.linear(x, layer.packed, layer.bias, out, relu=relu)
        if layer.bias is None:
            torch.mm(x, layer.weight.t(), out=out)
        else:
            torch.addmm(layer.bias, x, layer.weight.t(), out=out)
        return out.relu_() if relu else out

    def _add_product(self, tokens: torch.Tensor, x: torch.Tensor, layer: _Linear, work: _Workspace) -> None:
        """``tokens += x @ weight.T + bias`` with float32 ``tokens`` and compute-dtype ``x``."""
        if layer.packed is not None:  # float32 accumulators added straight into the tokens
            self.amx.linear(x, layer.packed, layer.bias, tokens, accumulate=True)
            return
        if self.dtype == torch.float32:
            tokens.addmm_(x, layer.weight.t())
            if layer.bias is not None:
                tokens.add_(layer.bias)
            return
        tokens.add_(self._linear(x, layer, work.get("product", tuple(tokens.shape), self.dtype)))

    def _row_stats(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Mean and 1/std ``(M, 1)`` of every row of float32 ``(M, C)`` tokens, LayerNorm's eps included.

        One mean and one sum-of-squares reduction (several times faster than
        the LayerNorm kernel on the CPU). Rows whose squared mean exceeds
        :data:`ILL_CONDITIONED_RATIO` times their variance lose precision
        there and in ``t * rstd - mean * rstd``: their indices are returned
        (None when there are none) for :meth:`_normalize_rows_exactly`.
        """
        mean = tokens.mean(dim=1, keepdim=True)
        mean_sq = torch.linalg.vector_norm(tokens, dim=1, keepdim=True).square_().div_(tokens.shape[1])
        var = mean_sq.sub_(mean.square())
        ill = mean.square() > ILL_CONDITIONED_RATIO * var
        rows = ill.view(-1).nonzero().view(-1) if bool(ill.any()) else None
        return mean, var.clamp_(min=0).add_(self.eps).rsqrt_(), rows

    def _normalize_rows_exactly(self, tokens: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Overwrite ``out[rows]`` with the LayerNorm of ``tokens[rows]`` computed in float64."""
        x = tokens[rows].double()
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        out[rows] = ((x - mean) * torch.rsqrt(var + self.eps)).to(out.dtype)

    def _normalize(self, tokens: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """LayerNorm without affine of float32 ``(M, C)`` tokens, written to ``out`` (any float dtype)."""
        if tokens.device.type != "cpu":
            out.copy_(F.layer_norm(tokens, tokens.shape[1:], None, None, self.eps))
            return out
        if self.amx is not None and out.dtype == torch.bfloat16 and tokens.shape[1] % 16 == 0:
            return self.amx.layernorm(tokens, self.eps, out)
        mean, rstd, ill_rows = self._row_stats(tokens)
        torch.addcmul(mean.mul_(rstd).neg_(), tokens, rstd, out=out)
        if ill_rows is not None:
            self._normalize_rows_exactly(tokens, ill_rows, out)
        return out

    def _channel_mix(self, tokens: torch.Tensor, fold: _FoldedChannelMix, work: _Workspace) -> None:
        """``tokens += s * (W2 act(W1 norm(tokens) + b1) + b2)`` in place."""
        m, width = tokens.shape
        if fold.layernorm:
            x = self._normalize(tokens, work.get("normalized", (m, width), self.dtype))
        elif self.dtype != torch.float32:
            x = work.get("normalized", (m, width), self.dtype)
            x.copy_(tokens)
        else:
            x = tokens
        hidden = work.get("hidden", (m, fold.hidden.out_features), self.dtype)
        self._linear(x, fold.hidden, hidden, relu=self.act == "relu")
        if self.act != "relu":
            _activation_(self.act)(hidden)
        self._add_product(tokens, hidden, fold.out, work)

    def _spatial_mix(self, tokens: torch.Tensor, fold: _FoldedSpatialMix, cells: _PlaneCells, work: _Workspace) -> None:
        """``tokens += s * conv2(act(conv1(cell means of norm(tokens))))`` read at each point's cell, in place."""
        m, width = tokens.shape
        occ, dil = cells.num_occupied, cells.num_dilated
        # cell means of the normalised tokens (the norm affine commutes with the mean over a cell)
        means = work.get("means", (occ + 1, width), torch.float32)
        self._cell_means(tokens, fold.layernorm, cells, means[:occ], work)
        torch.addcmul(fold.shift, means[:occ], fold.scale, out=means[:occ])
        means[occ].zero_()
        # first conv on the occupied cells' neighbourhoods, then the activation
        hidden = work.get("cell_hidden", (dil + 1, width), torch.float32)
        if cells.conv1_matrix is not None:
            stacked = work.get("stacked", (9, occ, width), torch.float32)
            torch.mul(means[:occ].unsqueeze(0), fold.conv1.unsqueeze(1), out=stacked)
            torch.mm(cells.conv1_matrix, stacked.view(9 * occ, width), out=hidden[:dil])
            hidden[:dil].add_(fold.bias1)
        else:
            self._taps(means, cells.conv1_taps, fold.conv1, fold.bias1, hidden[:dil], work)
        _activation_(self.act)(hidden[:dil])
        hidden[dil].zero_()
        # second conv (LayerScale folded) on the occupied cells, read back by every point
        out = work.get("cell_out", (occ, width), torch.float32)
        self._taps(hidden, cells.conv2_taps, fold.conv2, fold.bias2, out, work)
        if cells.read_matrix is not None:
            tokens.addmm_(cells.read_matrix, out)
        else:
            gathered = work.get("normalized", (m, width), torch.float32)  # free again: the means are taken
            tokens.add_(torch.index_select(out, 0, cells.inverse, out=gathered))

    def _cell_means(
        self, tokens: torch.Tensor, layernorm: bool, cells: _PlaneCells, out: torch.Tensor, work: _Workspace
    ) -> None:
        """``out`` ``(O, C)``: mean over each occupied cell of the normalised (LayerNorm without
        affine) or, for BatchNorm, the raw ``(M, C)`` tokens."""
        matrix = cells.mean_matrix
        source = tokens
        if layernorm:
            if matrix is not None:
                mean, rstd, ill_rows = self._row_stats(tokens)
                if ill_rows is None:
                    # mean over a cell of (t - mu) * rstd = A diag(rstd) t - A diag(rstd) mu: no normalised copy
                    torch.mul(rstd.view(-1)[cells.mean_order], cells.mean_weights, out=matrix.values())
                    torch.mm(matrix, tokens, out=out)
                    out.sub_(torch.mm(matrix, mean))
                    return
            source = self._normalize(tokens, work.get("normalized", tuple(tokens.shape), torch.float32))
        if matrix is not None:
            matrix.values().copy_(cells.mean_weights)
            torch.mm(matrix, source, out=out)
        else:
            out.zero_().index_add_(0, cells.inverse, source).mul_(cells.inv_count)

    def _taps(
        self,
        table: torch.Tensor,
        taps: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        out: torch.Tensor,
        work: _Workspace,
    ) -> None:
        """Depthwise 3x3 conv at ``X`` cells: ``out[x] = bias + sum_k weight[k] * table[taps[x, k]]``.

        ``table`` ``(R+1, C)`` ends with a zero row, ``taps`` is ``(X, 9)``,
        ``weight`` ``(9, C)``, ``out`` ``(X, C)``.
        """
        if not self.sparse_kernels:  # one gather of all taps: few kernel launches
            torch.sum(table[taps] * weight, dim=1, out=out)
            out.add_(bias)
            return
        out.copy_(bias.expand_as(out))  # one tap at a time through a reused (X, C) buffer
        gathered = work.get("taps", tuple(out.shape), out.dtype)
        for k in range(taps.shape[1]):
            torch.index_select(table, 0, taps[:, k], out=gathered)
            out.addcmul_(gathered, weight[k])

    def _head(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.to(self.dtype)
        for layer in self.head:
            x = x.relu_() if layer == "relu" else F.linear(x, layer.weight, layer.bias)
        return x.float()


# --------------------------------------------------------------------------- cache

#: Bumped whenever any module anywhere gets a parameter, buffer or submodule
#: assigned, so that a cached engine re-checks its model's full structure.
_structure_epoch = 0


def _bump_structure_epoch(*_args: object) -> None:
    global _structure_epoch
    _structure_epoch += 1


_module_hooks = torch.nn.modules.module
_module_hooks.register_module_parameter_registration_hook(_bump_structure_epoch)
_module_hooks.register_module_buffer_registration_hook(_bump_structure_epoch)
_module_hooks.register_module_module_registration_hook(_bump_structure_epoch)


@dataclass
class _CacheEntry:
    """An engine and the state of the weights it was folded from."""

    engine: FastWaffleIron
    epoch: int
    tensors: list[torch.Tensor]
    versions: list[tuple[int, int]]
    signature: tuple

    def still_valid(self) -> bool:
        """Cheap check: no assignment anywhere since, and every tensor unchanged in place."""
        return self.epoch == _structure_epoch and self.versions == _versions(self.tensors)


_CACHE: "weakref.WeakKeyDictionary[WaffleIron, dict[object, _CacheEntry]]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _versions(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(t.data_ptr(), t._version) for t in tensors]


def _weights_state(model: WaffleIron) -> tuple[list[torch.Tensor], tuple]:
    """Every parameter and buffer, and a signature that changes whenever any of them changes."""
    named = list(model.state_dict(keep_vars=True).items())
    signature = tuple((name, id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for name, t in named)
    return [t for _, t in named], signature


def fast_engine(model: WaffleIron, dtype: torch.dtype | None = None, *, sparse_kernels: bool | None = None) -> FastWaffleIron:
    """The :class:`FastWaffleIron` of ``model`` for ``dtype``, cached while its weights are unchanged.

    The cache is keyed on the model object. An engine is rebuilt when any
    parameter or buffer was modified in place (an optimiser step,
    ``load_state_dict``), replaced, or moved (``.to()``), or a submodule was
    replaced.

    Raises:
        RuntimeError: the model is in training mode.
    """
    if model.training:
        raise RuntimeError(
            "the fast engine is for inference and needs the model in eval mode (call model.eval()); "
            "train with the model's own forward"
        )
    key = (dtype or torch.float32, sparse_kernels)
    with _CACHE_LOCK:
        entry = _CACHE.get(model, {}).get(key)
        if entry is not None and entry.still_valid():
            return entry.engine
        epoch = _structure_epoch
        tensors, signature = _weights_state(model)
        if entry is not None and entry.signature == signature:
            entry.epoch, entry.versions = epoch, _versions(tensors)
            return entry.engine
        engine = FastWaffleIron(model, dtype, sparse_kernels=sparse_kernels)
        logger.debug("built the fast engine of %s for %s", model.config.name or "a model", key[0])
        _CACHE.setdefault(model, {})[key] = _CacheEntry(engine, epoch, tensors, _versions(tensors), signature)
        return engine
