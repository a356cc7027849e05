"""The WaffleIron network (backbone, embedding and heads).

Tokens are kept *point-major and packed*: the kept points of every cloud of a
batch are concatenated into one ``(M, C)`` tensor, so there is no padding. A
cloud's 2D cells are offset by ``cloud_index * cells_per_plane``, which keeps
the clouds of a batch apart in the spatial mixing; the neighbour indices of
the embedding are global row indices into the packed tensor.

Parameter names and shapes are those of the original checkpoints once the
``module.`` prefix is stripped (``embed.*``, ``waffleiron.*``, ``classif.*``),
so an original state dict loads strictly.

Training switches (none of them adds state-dict keys): drop-path
(:meth:`WaffleIron.set_drop_path`), gradient checkpointing
(:meth:`WaffleIron.set_grad_checkpointing`), a fresh class head
(:meth:`WaffleIron.reset_head`) and a frozen backbone for linear probing
(:meth:`WaffleIron.freeze_backbone`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ArchConfig, ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["WaffleIron", "PackedInput"]

#: Points per chunk of the embedding's neighbour branch when no gradient is
#: needed, bounding its (chunk, K, C) intermediate.
EMBED_CHUNK_POINTS = 4096


@dataclass
class PackedInput:
    """Network input for a batch of clouds, packed point-major.

    Attributes:
        features: ``(M, 5)`` float per-point input (intensity, x, y, z, radius)
            of the kept points of all clouds, concatenated.
        neighbors: ``(M, K+1)`` int64 global row indices; column 0 is the point itself.
        cell_index: ``(P, M)`` int64 flat cell of each point on each of the P
            projection planes, already offset by ``cloud * cells_per_plane``.
        grids: ``P`` grid shapes ``(rows, cols)``.
        num_clouds: B, number of clouds packed.
    """

    features: torch.Tensor
    neighbors: torch.Tensor
    cell_index: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    num_clouds: int

    def to(self, device: torch.device | str) -> "PackedInput":
        """A copy with every tensor on ``device``."""
        return PackedInput(
            self.features.to(device),
            self.neighbors.to(device),
            self.cell_index.to(device),
            self.grids,
            self.num_clouds,
        )


class _RowBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d applied to ``(rows, channels)``: same statistics and keys,
    point-major input (rows are the (point, neighbour) pairs)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() != 2:
            raise ValueError(f"expected (rows, channels) input, got shape {tuple(input.shape)}")


def _pointwise(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a kernel-size-1 convolution to point-major ``x`` (..., C_in) -> (..., C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _activation(kind: str) -> nn.Module:
    return nn.ReLU() if kind == "relu" else nn.GELU()


def _norm(kind: str, width: int, eps: float) -> nn.Module:
    return nn.LayerNorm(width, eps=eps) if kind == "layernorm" else nn.BatchNorm1d(width)


class Embedding(nn.Module):
    """Point embedding: a point term plus a max over K neighbour differences.

    Input ``(M, 5)`` features and ``(M, K+1)`` neighbours; output ``(M, C)``.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_channels)
        self.conv1 = nn.Conv1d(in_channels, width, 1)
        self.conv2 = nn.Sequential(
            _RowBatchNorm2d(in_channels),
            nn.Conv2d(in_channels, width, 1, bias=False),
            _RowBatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 1, bias=False),
        )
        self.final = nn.Conv1d(2 * width, width, 1)

    def forward(self, features: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        x = self.norm(features)
        point_term = _pointwise(self.conv1, x)
        nbr = neighbors[:, 1:]
        if torch.is_grad_enabled() or nbr.shape[0] <= EMBED_CHUNK_POINTS:
            neighbor_term = self._neighbor_term_rows(x, nbr, 0, nbr.shape[0])
        else:
            neighbor_term = torch.cat(
                [
                    self._neighbor_term_rows(x, nbr, start, min(start + EMBED_CHUNK_POINTS, nbr.shape[0]))
                    for start in range(0, nbr.shape[0], EMBED_CHUNK_POINTS)
                ]
            )
        return _pointwise(self.final, torch.cat([point_term, neighbor_term], dim=1))

    def _neighbor_term_rows(self, x: torch.Tensor, nbr: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Max over neighbours of the MLP of ``x[nbr] - x`` for points ``start:stop`` -> (stop-start, C)."""
        rows = nbr[start:stop]
        # index_select rather than x[rows]: its backward (index_add_) is reproducible on CPU.
        gathered = x.index_select(0, rows.reshape(-1)).view(rows.shape[0], rows.shape[1], -1)
        diff = (gathered - x[start:stop].unsqueeze(1)).reshape(rows.numel(), -1)
        bn_in, conv_a, bn_mid, relu, conv_b = self.conv2
        h = _pointwise(conv_b, relu(bn_mid(_pointwise(conv_a, bn_in(diff)))))
        return h.view(rows.shape[0], rows.shape[1], -1).amax(dim=1)


class ChannelMix(nn.Module):
    """``t + s * (W2 act(W1 norm(t) + b1) + b2)`` on ``(M, C)`` tokens."""

    def __init__(self, width: int, norm: str, act: str, eps: float) -> None:
        super().__init__()
        self.norm = _norm(norm, width, eps)
        self.mlp = nn.Sequential(nn.Conv1d(width, width, 1), _activation(act), nn.Conv1d(width, width, 1))
        self.scale = nn.Conv1d(width, width, 1, groups=width, bias=False)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: optional ``(M, 1)`` drop-path factor of the residual branch (0 or 1/(1-rate))."""
        hidden = self.mlp[1](_pointwise(self.mlp[0], self.norm(tokens)))
        branch = _pointwise(self.mlp[2], hidden) * self.scale.weight.view(-1)
        return tokens + (branch if keep is None else branch * keep)


class SpatialMix(nn.Module):
    """Mix tokens through a 2D projection: cell means, two depthwise 3x3 convs, read back.

    ``(M, C)`` tokens and ``(M,)`` flat cells (cloud offset included) -> ``(M, C)``.
    Computed on the dense ``(B, C, rows, cols)`` grid, as the spec states it.
    """

    def __init__(self, width: int, norm: str, act: str, eps: float) -> None:
        super().__init__()
        self.norm = _norm(norm, width, eps)
        self.ffn = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width),
            _activation(act),
            nn.Conv2d(width, width, 3, padding=1, groups=width),
        )
        self.scale = nn.Conv1d(width, width, 1, groups=width, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        cells: torch.Tensor,
        grid: tuple[int, int],
        num_clouds: int,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``keep``: optional ``(M, 1)`` drop-path factor of the residual branch (0 or 1/(1-rate))."""
        y = self.norm(tokens)
        rows, cols = grid
        num_cells = num_clouds * rows * cols
        width = y.shape[1]
        sums = y.new_zeros(num_cells, width).index_add_(0, cells, y)
        counts = torch.bincount(cells, minlength=num_cells).clamp_(min=1).to(y.dtype)
        image = (sums / counts.unsqueeze(1)).view(num_clouds, rows, cols, width).permute(0, 3, 1, 2)
        image = self.ffn(image)
        branch = image.permute(0, 2, 3, 1).reshape(num_cells, width).index_select(0, cells) * self.scale.weight.view(-1)
        return tokens + (branch if keep is None else branch * keep)


class Backbone(nn.Module):
    """L layers, each a spatial mix along projection ``dim_proj[d % P]`` then a channel mix.

    Attributes:
        drop_path_rates: drop-path rate of the residual branches of layer d
            (training mode only); all 0 by default.
        grad_checkpointing: recompute each layer in the backward pass instead
            of keeping its activations (training with gradients only).
    """

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.dim_proj = arch.dim_proj
        args = (arch.width, arch.norm, arch.act, arch.layer_norm_eps)
        self.channel_mix = nn.ModuleList([ChannelMix(*args) for _ in range(arch.depth)])
        self.spatial_mix = nn.ModuleList([SpatialMix(*args) for _ in range(arch.depth)])
        self.drop_path_rates: list[float] = [0.0] * arch.depth
        self.grad_checkpointing = False

    def forward(self, tokens: torch.Tensor, packed: PackedInput) -> torch.Tensor:
        cloud_of_row = None
        if self.training and any(self.drop_path_rates):
            # Plane 0 cells are offset by cloud * rows * cols: the cloud of each row.
            rows, cols = packed.grids[0]
            cloud_of_row = packed.cell_index[0] // (rows * cols)
        for d in range(len(self.spatial_mix)):
            keeps = (None, None)
            if cloud_of_row is not None and self.drop_path_rates[d] > 0:
                keeps = tuple(
                    _drop_path_keep(self.drop_path_rates[d], cloud_of_row, packed.num_clouds, tokens.dtype)
                    for _ in range(2)
                )
            if self.grad_checkpointing and torch.is_grad_enabled():
                layer_modules = (self.spatial_mix[d], self.channel_mix[d])
                tokens = _checkpointed(self._layer, layer_modules, d, tokens, packed, *keeps)
            else:
                tokens = self._layer(d, tokens, packed, *keeps)
        return tokens

    def _layer(
        self,
        d: int,
        tokens: torch.Tensor,
        packed: PackedInput,
        spatial_keep: torch.Tensor | None,
        channel_keep: torch.Tensor | None,
    ) -> torch.Tensor:
        plane = d % len(self.dim_proj)
        tokens = self.spatial_mix[d](
            tokens, packed.cell_index[plane], packed.grids[plane], packed.num_clouds, spatial_keep
        )
        return self.channel_mix[d](tokens, channel_keep)


def _drop_path_keep(rate: float, cloud_of_row: torch.Tensor, num_clouds: int, dtype: torch.dtype) -> torch.Tensor:
    """Stochastic depth factor ``(M, 1)``: per cloud, 0 with probability ``rate``, else ``1/(1-rate)``."""
    keep_prob = 1.0 - rate
    per_cloud = torch.empty(num_clouds, device=cloud_of_row.device, dtype=dtype).bernoulli_(keep_prob)
    return (per_cloud / keep_prob)[cloud_of_row].unsqueeze(1)


@contextlib.contextmanager
def _batchnorm_stats_frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """BatchNorms run as usual (batch statistics in training) but their running statistics stay put.

    Momentum 0 keeps the running mean and variance (the op and its saved
    tensors are the same as in the first forward pass, which checkpointing
    requires); the batch counter is restored on exit.
    """
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _checkpointed(function: Any, modules: Sequence[nn.Module], *args: Any) -> torch.Tensor:
    """``function(*args)`` under non-reentrant activation checkpointing.

    The recomputation in the backward pass leaves the BatchNorm running
    statistics of ``modules`` alone, so they are updated once per step as
    without checkpointing.
    """
    return checkpoint(
        function,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _batchnorm_stats_frozen(modules)),
    )


def build_head(arch: ArchConfig) -> nn.Module | None:
    """The head named by ``arch.head`` (None for ``"none"``), with the original key layout."""
    c, out = arch.width, arch.out
    if arch.head == "linear":
        return nn.Conv1d(c, out, 1)
    if arch.head == "mlp":
        return nn.Sequential(nn.Conv1d(c, arch.hidden, 1), nn.ReLU(), nn.Conv1d(arch.hidden, out, 1))
    if arch.head == "bn_linear":
        return nn.Sequential(nn.BatchNorm1d(c), nn.Conv1d(c, out, 1))
    return None


def apply_head(head: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Run a head built by :func:`build_head` on ``(M, C)`` tokens -> ``(M, out)``."""
    if isinstance(head, nn.Conv1d):
        return _pointwise(head, tokens)
    x = tokens
    for layer in head:
        x = _pointwise(layer, x) if isinstance(layer, nn.Conv1d) else layer(x)
    return x


class WaffleIron(nn.Module, PyTorchModelHubMixin):
    """A WaffleIron / ScaLR network with its preprocessing configuration.

    Build it from a :class:`~scalr_zoo.config.ModelConfig`; load weights with
    ``load_state_dict`` (original keys, ``module.`` stripped) or through
    :func:`scalr_zoo.load`. :meth:`extract` turns raw point clouds into
    per-point features. ``save_pretrained(dir)`` / ``push_to_hub(repo_id)``
    (huggingface_hub's mixin) write ``model.safetensors``, ``config.json`` and
    a model card; :meth:`from_pretrained` reads them back (see
    :mod:`scalr_zoo.publish`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        arch = config.arch
        self.embed = Embedding(arch.in_channels, arch.width)
        self.waffleiron = Backbone(arch)
        head = build_head(arch)
        if head is not None:
            self.classif = head
        self._backbone_frozen = False

    @property
    def has_head(self) -> bool:
        """Whether the network has a head (distillation or class head)."""
        return hasattr(self, "classif")

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def num_features(self) -> int:
        """C, channels of the backbone features."""
        return self.config.arch.width

    def forward_backbone(self, packed: PackedInput) -> torch.Tensor:
        """Backbone tokens ``(M, C)`` of packed kept points."""
        if self.waffleiron.grad_checkpointing and torch.is_grad_enabled():
            tokens = _checkpointed(self.embed, (self.embed,), packed.features, packed.neighbors)
        else:
            tokens = self.embed(packed.features, packed.neighbors)
        return self.waffleiron(tokens, packed)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Head outputs ``(M, out)`` of backbone tokens ``(M, C)``."""
        if not self.has_head:
            raise ValueError(
                "this model has no head (head='none'); call extract(..., head=False) for backbone features"
            )
        return apply_head(self.classif, tokens)

    def forward(self, packed: PackedInput, head: bool = False) -> torch.Tensor:
        """``(M, C)`` backbone tokens, or ``(M, out)`` head outputs with ``head=True``."""
        tokens = self.forward_backbone(packed)
        return self.forward_head(tokens) if head else tokens

    # ----------------------------------------------------------------- training

    def set_drop_path(self, rate: float, schedule: str = "linear") -> None:
        """Stochastic depth on the residual branches of every spatial and channel mix.

        In training mode each branch of layer d is dropped for a whole cloud
        with probability ``rate_d`` (and scaled by ``1/(1-rate_d)`` when
        kept); eval mode never drops. No state-dict key is added.

        Args:
            rate: the largest rate, in ``[0, 1)``; 0 switches drop-path off.
            schedule: ``"linear"`` (``rate * d / (L-1)``: 0 at the first layer,
                ``rate`` at the last, as timm does) or ``"uniform"`` (``rate``
                everywhere, as the original ScaLR fine-tuning recipe does).
        """
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {rate}")
        depth = len(self.waffleiron.spatial_mix)
        if schedule == "linear":
            rates = [rate * d / (depth - 1) if depth > 1 else rate for d in range(depth)]
        elif schedule == "uniform":
            rates = [rate] * depth
        else:
            raise ValueError(f"drop-path schedule must be 'linear' or 'uniform', got {schedule!r}")
        self.waffleiron.drop_path_rates = [float(r) for r in rates]

    @property
    def drop_path_rates(self) -> list[float]:
        """Drop-path rate of each backbone layer."""
        return list(self.waffleiron.drop_path_rates)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the embedding and each backbone layer in the backward pass.

        Uses ``torch.utils.checkpoint`` (non-reentrant) per layer; activations
        memory drops from O(L) layers to about one. Gradients are unchanged,
        and BatchNorm running statistics are updated once per step as without
        checkpointing. Only active while gradients are enabled.
        """
        self.waffleiron.grad_checkpointing = bool(enable)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether gradient checkpointing is on."""
        return self.waffleiron.grad_checkpointing

    def reset_head(self, num_classes: int, classes: Sequence[str] | None = None) -> None:
        """Replace the head by a fresh class head: BatchNorm1d(C) then Conv1d(C, num_classes).

        This is the ``"bn_linear"`` head of the original downstream recipe,
        initialised as it does: default BatchNorm, zero convolution weight and
        bias (all logits start at 0). ``config`` follows (head, out, classes).

        Args:
            num_classes: K, output channels.
            classes: K class names in output order (optional).
        """
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names given for num_classes={num_classes}")
        width = self.num_features
        reference = next(self.parameters())
        head = nn.Sequential(nn.BatchNorm1d(width), nn.Conv1d(width, num_classes, 1))
        nn.init.zeros_(head[1].weight)
        nn.init.zeros_(head[1].bias)
        self.classif = head.to(device=reference.device, dtype=reference.dtype).train(self.training)
        arch = dataclasses.replace(self.config.arch, head="bn_linear", out=num_classes, hidden=None)
        self.config = dataclasses.replace(
            self.config, arch=arch, classes=tuple(classes) if classes is not None else None
        )

    def freeze_backbone(self) -> None:
        """Freeze the embedding and the backbone for linear probing.

        Their parameters stop requiring gradients and they stay in eval mode
        (BatchNorm running statistics untouched, no drop-path) even after
        ``model.train()``; only the head trains.
        """
        for part in (self.embed, self.waffleiron):
            part.requires_grad_(False)
            part.eval()
        self._backbone_frozen = True

    def unfreeze_backbone(self) -> None:
        """Undo :meth:`freeze_backbone`: every parameter trains and follows ``model.train()``."""
        for part in (self.embed, self.waffleiron):
            part.requires_grad_(True)
        self._backbone_frozen = False
        self.train(self.training)

    @property
    def backbone_frozen(self) -> bool:
        """Whether :meth:`freeze_backbone` is in effect."""
        return self._backbone_frozen

    def train(self, mode: bool = True) -> "WaffleIron":
        """Set training mode; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self._backbone_frozen:
            self.embed.eval()
            self.waffleiron.eval()
        return self

    def extract(
        self,
        points: "torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]",
        **kwargs: Any,
    ) -> Any:
        """Per-point features of raw clouds; see :func:`scalr_zoo.extract.extract`."""
        from .extract import extract

        return extract(self, points, **kwargs)

    def segment(
        self,
        points: "torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]",
        **kwargs: Any,
    ) -> Any:
        """Class id, name and probability of every point; see :func:`scalr_zoo.segment.segment`."""
        from .segment import segment

        return segment(self, points, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """Mixin hook of ``save_pretrained``: ``model.safetensors`` and ``config.json``."""
        from .publish import write_model_files

        write_model_files(self, save_directory)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The ``README.md`` that ``save_pretrained`` / ``push_to_hub`` write."""
        from .publish import model_card

        return model_card(self.config, repo_id=kwargs.get("repo_id"))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload to a Hub repository (huggingface_hub's mixin); the model card names the repository."""
        kwargs["model_card_kwargs"] = {"repo_id": repo_id, **(kwargs.get("model_card_kwargs") or {})}
        return super().push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> "WaffleIron":
        """Load like :func:`scalr_zoo.load`; a bare ``owner/repo`` means that Hub repository."""
        from .publish import from_pretrained

        return from_pretrained(pretrained_model_name_or_path, **kwargs)
