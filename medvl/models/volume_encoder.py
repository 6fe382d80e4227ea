"""VolumeEncoder: the 3D ViT vision tower of the CLIP model (raw int16 CT in, one projected vector out).

The first layer is ``medvl.nn.PatchEmbed3d``: the HU window, the patchify, the projection, the bias and
the position embedding run as one fused pass over the raw volume (``medvl.ops.patch_embed3d``). Optionally
(``stem``) a few strided 3x3x3 convolutions come first, on the windowed volume, and the fused op embeds their
feature map: a hybrid ViT, for findings smaller than a patch. When a
volume's patch grid differs from the configured one the position table is resampled (trilinear) to the
new grid and handed to the module for that call, so the add stays inside the kernel for every input size.
After it: an optional CLS token, pre-norm transformer blocks (``scaled_dot_product_attention``), a final
LayerNorm, CLS, mean or max pooling, a bias-free projection into the shared image-text space and, optionally,
the standardisation of the projected embedding (:mod:`medvl.nn.standardize`).

Volumes are (B, C, X, Y, Z), channel first, as the MONAI pipelines of ``medvl.data`` give them: the
axial (slice) axis is the last one, Z. Tokens are in ``Conv3d(...).flatten(2).transpose(1, 2)`` order,
token index = (ix * n_y + iy) * n_z + iz.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from medvl.data.transforms import CT_WINDOW
from medvl.nn.standardize import FeatureStandardizer
from medvl.nn.patch_embed3d import PatchEmbed3d, as_triple
from medvl.options import look_up_option
from medvl.reference.patch_embed3d import window_volume

POOLS = ("cls", "mean", "max")
POS_EMBEDS = ("learnable", "sincos")


class Attention(torch.nn.Module):
    """Multi-head self-attention: one fused qkv Linear, ``scaled_dot_product_attention``, output Linear."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.dropout = num_heads, dim // num_heads, float(dropout)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim)
        self.proj_drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # (B, N, 3E) -> (3, B, H, N, D)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(x))


class Mlp(torch.nn.Module):
    """Linear -> GELU -> Linear (dropout after each Linear when set)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(hidden, dim)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvStem(torch.nn.Module):
    """The window, then one stride-2 3x3x3 convolution, GroupNorm and GELU per width in ``widths``.

    Why: a patch embedding is linear in the patch's voxels, so a 14 mm nodule inside an 8 x 8 x 8 patch
    moves the token along the same direction as the lung edge that crosses the next patch; a convolution
    and a nonlinearity first give the patch embedding local shape features to project. On the CT phantoms,
    the image tower trained on the finding labels for 300 steps (held-out macro AUC, 2-core EPYC, 2026-12-05):
    8 x 8 x 8 patches 0.71; one stride-2 convolution of width 8, then 4 x 4 x 4 patches (the same 8 x 8 x 8
    input voxels a token) 0.77, width 16 0.79; a 2 x 2 x 2 stride-2 convolution instead 0.71 (the overlap
    matters: emphysema's small holes went from 0.65 to 0.97). GroupNorm, not BatchNorm: a sample's features
    never depend on its batch (they do depend on its whole volume, through the GroupNorm statistics).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], window: Optional[Tuple[float, float]]):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"stem widths must be positive integers, got {widths!r}")
        self.window = None if window is None else (float(window[0]), float(window[1]))
        layers, width = [], in_channels
        for out in widths:
            layers += [torch.nn.Conv3d(width, out, 3, stride=2, padding=1),
                       torch.nn.GroupNorm(math.gcd(out, 4), out), torch.nn.GELU()]
            width = out
        self.layers = torch.nn.Sequential(*layers)
        self.out_channels, self.stride = width, 2 ** len(widths)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        # the window the fused patch embedding applies without a stem, to [0, 1]
        return self.layers(window_volume(volume, self.window, (0.0, 1.0), self.layers[0].weight.dtype))


class Block(torch.nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 dropout: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, dropout=dropout)
        self.norm2 = torch.nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def interpolate_pos_embed3d(pos_embed: torch.Tensor, old_grid: Sequence[int],
                            new_grid: Sequence[int]) -> torch.Tensor:
    """Resample a (1, N, E) or (N, E) position table from ``old_grid`` to ``new_grid``: (N', E).

    Trilinear, ``align_corners=False`` (the table is treated as values at patch centres). Returns the
    table itself, reshaped to (N, E), when the grids are equal, so the same-size path is exact.
    Differentiable: gradients reach the original table.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    embed = pos_embed.shape[-1]
    table = pos_embed.reshape(-1, embed)
    if table.shape[0] != math.prod(old_grid):
        raise ValueError(f"pos_embed has {table.shape[0]} rows but the grid {old_grid} has {math.prod(old_grid)}")
    if old_grid == new_grid:
        return table
    grid = table.reshape(1, *old_grid, embed).permute(0, 4, 1, 2, 3)  # (1, E, gx, gy, gz)
    grid = F.interpolate(grid.float(), size=new_grid, mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(math.prod(new_grid), embed).to(pos_embed.dtype)


class VolumeEncoder(torch.nn.Module):
    """3D ViT over raw CT volumes: fused patch embedding, pre-norm blocks, pooling, projection.

    Args:
        img_size: (X, Y, Z) the position table is built for; other sizes (multiples of the patch) work
            through a trilinear resampling of the table.
        patch_size: (p_x, p_y, p_z).
        in_channels: volume channels C.
        embed_dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP hidden = ratio * width.
        output_dim: size of the shared image-text space (``self.proj``, no bias).
        window: (lo, hi) HU window applied inside the fused patch embedding (to [0, 1]); None: raw values.
        pos_embed: "learnable" (trunc-normal 0.02) or "sincos" (fixed 3D sin-cos buffer; embed_dim % 6 == 0).
        pool: "cls" (a learnable token prepended after the patch embedding, with its own learnable position
            vector ``cls_pos_embed``), "mean" (mean of the final-norm patch tokens) or "max" (their
            feature-wise maximum: a finding that changes a few tokens moves it fully, where the mean of N
            tokens moves by 1/N).
        stem: widths of the stride-2 convolutions (:class:`ConvStem`) run on the windowed volume before the
            patch embedding, which then embeds their last feature map unwindowed; empty (default): the fused
            op embeds the raw volume. ``img_size`` and ``patch_size`` stay in input voxels (a token covers
            the same input either way) and must be multiples of the stem's stride, 2 ** len(stem).
        grad_checkpointing: recompute each block in backward (training only); see ``set_grad_checkpointing``.
        dropout: attention-probability dropout and dropout after the attention / MLP Linears (training only).
        qkv_bias: bias in the fused qkv Linear.
        norm_eps: LayerNorm epsilon.
        standardize: standardise the projected embedding per feature (``self.standardizer``, a
            :class:`~medvl.nn.standardize.FeatureStandardizer`: stored statistics here, the batch's in the
            training losses); off keeps the plain ViT (and the checkpoints saved without it).

    ``forward(volume, return_tokens=False, return_depth=False)`` returns a dict with ``embedding``
    (B, output_dim): the projection, standardised with the stored statistics when ``standardize``;
    ``projected`` (B, output_dim): the projection before that (what the training losses standardise over the
    batch); ``pooled`` (B, embed_dim): the pooled features the projection reads; and optionally ``tokens``
    (B, N, embed_dim), the final-norm patch tokens without the CLS token, and ``depth`` (B, n_z, embed_dim):
    the patch tokens on their (n_x, n_y, n_z) grid averaged over the in-plane axes, one feature per axial patch
    row; row d covers slices [d * p_z, (d + 1) * p_z) of the input's last axis Z.

    Example:
        >>> encoder = VolumeEncoder(img_size=(64, 64, 32), patch_size=(16, 16, 8), embed_dim=96, depth=2,
        ...                         num_heads=3, output_dim=64)
        >>> out = encoder(torch.randint(-1024, 2000, (2, 1, 64, 64, 32), dtype=torch.int16), return_depth=True)
        >>> out["embedding"].shape, out["depth"].shape   # (2, 64), (2, 4, 96)
    """

    def __init__(self, *, img_size: Union[int, Sequence[int]] = (96, 96, 64),
                 patch_size: Union[int, Sequence[int]] = (16, 16, 16), in_channels: int = 1, embed_dim: int = 192,
                 depth: int = 4, num_heads: int = 3, mlp_ratio: float = 4.0, output_dim: int = 128,
                 window: Optional[Tuple[float, float]] = CT_WINDOW, pos_embed: str = "learnable",
                 pool: str = "cls", grad_checkpointing: bool = False, dropout: float = 0.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, standardize: bool = False, stem: Sequence[int] = ()):
        super().__init__()
        look_up_option(pos_embed, POS_EMBEDS, name="pos_embed")
        look_up_option(pool, POOLS, name="pool")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        window = None if window is None else tuple(float(w) for w in window)
        self.embed_dim, self.output_dim, self.pool = embed_dim, output_dim, pool
        self.grad_checkpointing = bool(grad_checkpointing)
        # With a stem the patch embedding reads the stem's feature map, already windowed, at 1/stride the size.
        self.stem = ConvStem(in_channels, stem, window) if stem else None
        stride = self.stem.stride if self.stem is not None else 1
        img_size, patch_size = as_triple(img_size, "img_size"), as_triple(patch_size, "patch_size")
        bad = [f"{name} {value}" for name, value in (("img_size", img_size), ("patch_size", patch_size))
               if any(v % stride for v in value)]
        if bad:
            raise ValueError(f"{' and '.join(bad)} must be multiples of the stem's stride {stride} "
                             f"(2 ** len(stem), stem={tuple(stem)}) on each axis")
        self.patch_embed = PatchEmbed3d(self.stem.out_channels if self.stem is not None else in_channels, embed_dim,
                                        tuple(v // stride for v in img_size), tuple(v // stride for v in patch_size),
                                        window=None if self.stem is not None else window, pos_embed=pos_embed)
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = self.patch_embed.grid
        if pool == "cls":
            self.cls_token = torch.nn.Parameter(torch.empty(1, 1, embed_dim))
            self.cls_pos_embed = torch.nn.Parameter(torch.empty(1, 1, embed_dim))
            torch.nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
            torch.nn.init.trunc_normal_(self.cls_pos_embed, std=0.02, a=-2.0, b=2.0)
        else:
            self.cls_token = self.cls_pos_embed = None
        self.blocks = torch.nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, dropout=dropout, norm_eps=norm_eps)
            for _ in range(depth)])
        # A bias on the final norm shifts every sample's embedding by one vector, which the standardisation
        # removes: its gradient is rounding noise, which Adam would turn into lr-sized steps. None there.
        self.norm = torch.nn.LayerNorm(embed_dim, eps=norm_eps, bias=not standardize)
        self.proj = torch.nn.Linear(embed_dim, output_dim, bias=False)
        self.standardizer = FeatureStandardizer(output_dim) if standardize else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (training only), trading compute for memory."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> Set[str]:
        """Names (as in ``named_parameters``) that take no weight decay: norms, biases, position
        embeddings and the CLS token."""
        names = {name for name, param in self.named_parameters() if param.ndim <= 1}
        embeddings = {"patch_embed.pos_embed", "cls_token", "cls_pos_embed"}  # pos_embed: a buffer when sincos
        names |= embeddings & {name for name, _ in self.named_parameters()}
        return names

    def patch_grid(self, spatial: Sequence[int]) -> Tuple[int, int, int]:
        """The (n_x, n_y, n_z) patch grid of a volume with spatial size ``spatial`` (multiples of the patch)."""
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != 3 or any(s < p or s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(f"volume size {spatial} must be a multiple of patch_size {self.patch_size} on each "
                             "axis; crop or resample it")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """The (N, E) patch position table for ``grid``: the configured table (the tensor itself, reshaped)
        on the configured grid, its trilinear resampling otherwise. Computed per call (nothing cached), so
        gradients reach ``patch_embed.pos_embed``."""
        return interpolate_pos_embed3d(self.patch_embed.pos_embed, self.grid, grid)

    # ------------------------------------------------------------------------------------------

    def forward_tokens(self, volume: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        """(B, [1 +] N, E) tokens after the final norm (CLS first when pool="cls") and the patch grid."""
        if not isinstance(volume, torch.Tensor) or volume.dim() != 5:
            shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__
            raise ValueError(f"volume must be a 5-D tensor (B, C, X, Y, Z), got {shape}")
        grid = self.patch_grid(volume.shape[2:])
        features = volume if self.stem is None else self.stem(volume)
        x = self.patch_embed(features, pos_embed=self.position_embedding(grid))
        return self.transform_patch_tokens(x), grid

    def transform_patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, E) patch tokens -> normalised output tokens: CLS prepended, the blocks, the final norm."""
        if self.cls_token is not None:
            cls = (self.cls_token + self.cls_pos_embed).to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return self.norm(x)

    def forward(self, volume: torch.Tensor, *, return_tokens: bool = False,
                return_depth: bool = False) -> Dict[str, torch.Tensor]:
        x, grid = self.forward_tokens(volume)
        if self.cls_token is not None:
            pooled, tokens = x[:, 0], x[:, 1:]
        else:
            tokens = x
            pooled = tokens.mean(dim=1) if self.pool == "mean" else tokens.amax(dim=1)
        projected = self.proj(pooled)
        embedding = projected if self.standardizer is None else self.standardizer(projected)
        out = {"embedding": embedding, "projected": projected, "pooled": pooled}
        if return_tokens:
            out["tokens"] = tokens
        if return_depth:
            # Token index (ix * n_y + iy) * n_z + iz: the grid is (n_x, n_y, n_z) in that order.
            out["depth"] = tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).mean(dim=(1, 2))
        return out
