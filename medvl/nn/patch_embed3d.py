"""PatchEmbed3d: the first layer of a 3D ViT, backed by medvl.patch_embed3d (window + Conv3d + pos, fused)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from medvl.ops.patch_embed3d import patch_embed3d
from medvl.options import look_up_option

POS_EMBED_KINDS = ("learnable", "sincos", None)


def as_triple(value, name: str) -> Tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return values


def sincos_pos_embed3d(grid: Sequence[int], embed_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, N, E) fixed 3D sin-cos embedding: E/6 frequencies per axis, sin and cos of each, axes in order."""
    if embed_dim % 6:
        raise ValueError(f"a 3D sin-cos position embedding needs embed_dim divisible by 6, got {embed_dim}")
    per_axis = embed_dim // 6
    frequencies = temperature ** (-torch.arange(per_axis, dtype=torch.float64) / per_axis)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    parts = []
    for position in axes:
        angle = position.reshape(-1, 1) * frequencies
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()[None]


class PatchEmbed3d(torch.nn.Module):
    """Window -> patchify -> project -> + bias + position embedding, in one fused pass.

    The weight is a Conv3d weight (E, C, p0, p1, p2); ``from_monai`` takes a MONAI
    ``PatchEmbeddingBlock(proj_type="conv")`` as it is. The input is the raw volume (int16 HU for CT);
    ``window=(lo, hi)`` is MONAI's ``ScaleIntensityRange(lo, hi, *out_range, clip=True)`` done inside.

    Example:
        >>> embed = PatchEmbed3d(1, 96, img_size=64, patch_size=16, window=(-1000, 400))
        >>> tokens = embed(torch.randint(-1024, 2000, (2, 1, 64, 64, 64), dtype=torch.int16))  # (2, 64, 96)
    """

    def __init__(self, in_channels: int, embed_dim: int, img_size: Union[int, Sequence[int]],
                 patch_size: Union[int, Sequence[int]], window: Optional[Tuple[float, float]] = None,
                 pos_embed: Optional[str] = "learnable", out_range: Tuple[float, float] = (0.0, 1.0),
                 pad: bool = False, bias: bool = True):
        super().__init__()
        look_up_option(pos_embed, POS_EMBED_KINDS, name="pos_embed")
        self.img_size, self.patch_size = as_triple(img_size, "img_size"), as_triple(patch_size, "patch_size")
        if not pad and any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}; "
                             "pass pad=True to zero-pad after the window")
        self.grid = tuple(-(-s // p) for s, p in zip(self.img_size, self.patch_size))
        self.window, self.out_range, self.pad = window, tuple(out_range), pad
        self.weight = torch.nn.Parameter(torch.empty(embed_dim, in_channels, *self.patch_size))
        torch.nn.init.trunc_normal_(self.weight, std=0.02, a=-2.0, b=2.0)
        self.bias = torch.nn.Parameter(torch.zeros(embed_dim)) if bias else None
        tokens = math.prod(self.grid)
        if pos_embed == "learnable":
            self.pos_embed = torch.nn.Parameter(torch.empty(1, tokens, embed_dim))
            torch.nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        elif pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed3d(self.grid, embed_dim))
        else:
            self.pos_embed = None

    def forward(self, volume: torch.Tensor, backend: Optional[str] = None, *,
                pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, E) tokens of ``volume``. ``pos_embed`` ((N, E) or (1, N, E)) is added instead of the module's
        own table: the table resampled for a volume whose patch grid is not the configured one."""
        return patch_embed3d(volume, self.weight, self.bias, self.pos_embed if pos_embed is None else pos_embed,
                             patch_size=self.patch_size, window=self.window, out_range=self.out_range, pad=self.pad,
                             backend=backend)

    @classmethod
    def from_monai(cls, block, window: Optional[Tuple[float, float]] = None,
                   out_range: Tuple[float, float] = (0.0, 1.0)) -> "PatchEmbed3d":
        """A PatchEmbed3d with the weights of a MONAI ``PatchEmbeddingBlock(proj_type="conv")`` (copied)."""
        conv = getattr(block, "patch_embeddings", None)
        if not isinstance(conv, torch.nn.Conv3d):
            raise TypeError("from_monai needs a 3D MONAI PatchEmbeddingBlock with proj_type='conv', got "
                            f"{type(block).__name__} with patch_embeddings={type(conv).__name__}")
        pos = block.position_embeddings
        tokens, embed_dim, patch = pos.shape[1], conv.out_channels, tuple(conv.kernel_size)
        module = cls(conv.in_channels, embed_dim, patch, patch, window=window, pos_embed=None, out_range=out_range,
                     bias=conv.bias is not None)
        # MONAI keeps only the token count: the input's grid is checked against pos_embed at each call.
        module.img_size = module.grid = None
        with torch.no_grad():
            module.weight.copy_(conv.weight)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        if isinstance(pos, torch.nn.Parameter) and pos.requires_grad:
            module.pos_embed = torch.nn.Parameter(pos.detach().clone().reshape(1, tokens, embed_dim))
        else:
            module.register_buffer("pos_embed", pos.detach().clone().reshape(1, tokens, embed_dim))
        return module.to(conv.weight.device)
