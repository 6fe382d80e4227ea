"""MONAI preprocessing pipelines for CT and MR volumes, and the bridge from (z, y, x) numpy arrays.

Axis and affine convention
--------------------------
DICOM series and the synthetic phantoms hand over numpy arrays indexed ``volume[z, y, x]`` (slice, row,
column) with ``spacing_zyx = (slice spacing, row spacing, column spacing)`` in mm. MONAI works on
channel-first tensors ``(C, i, j, k)`` whose affine maps a voxel index ``(i, j, k, 1)`` to world
millimetres in the RAS+ frame (+x = patient Right, +y = Anterior, +z = Superior: the NIfTI
convention that ``Orientationd`` and ``Spacingd`` read).

:func:`volume_to_metatensor` transposes, never flips::

    numpy volume[z, y, x]  ->  MetaTensor[0, x, y, z]          (i = x, j = y, k = z)

so the voxel ``(z, y, x)`` of the array is the voxel ``(0, x, y, z)`` of the tensor, and the affine is
``A = [[R @ diag(sx, sy, sz), origin], [0, 0, 0, 1]]`` with ``R``'s columns the RAS world directions
of the x, y and z array axes. ``orientation`` picks R:

* ``None`` or ``"RAS"``: R = identity (x -> Right, y -> Anterior, z -> Superior). The phantoms use
  this; a RAS reorientation is then a no-op.
* a three-letter axis code such as ``"LPS"``: the direction each of the x, y, z array axes points to.
  A standard axial DICOM series (ImageOrientationPatient = [1, 0, 0, 0, 1, 0], slices sorted by
  increasing position along the normal) is ``"LPS"``: columns run to patient Left, rows to Posterior,
  slices to Superior.
* six numbers: DICOM ImageOrientationPatient (row cosines then column cosines, in the LPS patient
  frame). The slice direction is their cross product, i.e. the array's z axis is assumed to increase
  along the slice normal (sort slices that way). They are converted to RAS by negating x and y.

``origin`` is the world position of voxel (0, 0, 0) in mm: RAS for ``None``/axis codes; for DICOM
cosines it is ImagePositionPatient of the first slice (LPS) and is converted to RAS as well.

Pipelines
---------
:func:`ct_transforms` and :func:`mr_transforms` return ``monai.transforms.Compose`` objects of
dictionary transforms. The input dict's ``"image"`` may be

* a ``MetaTensor``, channel-first ``(C, i, j, k)`` (a 3-D one gets a channel) with its affine;
* a numpy array / plain tensor in the (z, y, x) convention above, with the spacing under
  ``"spacing"`` (or ``"<key>_spacing"``) and optionally ``"orientation"``/``"origin"`` in the dict:
  it is converted with :func:`volume_to_metatensor`;
* a NIfTI (or any MONAI-readable) path when the pipeline was built with ``load=True``, which prepends
  ``LoadImaged(ensure_channel_first=True)``.

After the pipeline the image is a channel-first ``MetaTensor`` ``(C, X, Y, Z)`` in the requested
orientation (RAS: X = right, Y = anterior, Z = superior) whose spatial size is ``size``.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

__all__ = [
    "AIR_HU",
    "CT_WINDOW",
    "CastHUd",
    "ToChannelFirstMetaTensord",
    "affine_from_spacing",
    "ct_transforms",
    "light_augment",
    "metatensor_to_volume",
    "mr_transforms",
    "volume_to_metatensor",
    "window_value",
]

# Padding value for raw CT: air in Hounsfield units (what most scanners store outside the field of view).
AIR_HU = -1024.0
#: The HU window (lo, hi) raw CT is mapped through by default, here and in the models' first layer: air to
#: enhanced vessels, so lung, fat and soft tissue keep their contrast (bone saturates).
CT_WINDOW = (-1000.0, 400.0)
# Labels of the world frame our affines live in (RAS+); passed explicitly so Orientationd never guesses.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_AXIS_CODE = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
_INT16_MIN, _INT16_MAX = float(np.iinfo(np.int16).min), float(np.iinfo(np.int16).max)


# ----------------------------------------------------------------------------------------------------------
# numpy (z, y, x) <-> MetaTensor (C, x, y, z)
# ----------------------------------------------------------------------------------------------------------

def _directions(orientation: Union[None, str, Sequence[float], np.ndarray]) -> Tuple[np.ndarray, bool]:
    """(3x3 RAS direction matrix whose columns are the x, y, z array axes, whether the origin is LPS)."""
    if orientation is None:
        return np.eye(3), False
    if isinstance(orientation, str):
        codes = orientation.upper()
        if len(codes) != 3 or any(c not in _AXIS_CODE for c in codes):
            raise ValueError(f"orientation must be three axis codes from R/L, A/P, S/I, got {orientation!r}")
        if len({_AXIS_CODE[c][0] for c in codes}) != 3:
            raise ValueError(f"orientation {orientation!r} names one world axis twice")
        rot = np.zeros((3, 3))
        for col, c in enumerate(codes):
            row, sign = _AXIS_CODE[c]
            rot[row, col] = sign
        return rot, False
    cosines = np.asarray(orientation, dtype=np.float64).reshape(-1)
    if cosines.size != 6:
        raise ValueError("orientation must be None, axis codes like 'LPS', or the 6 DICOM "
                         f"ImageOrientationPatient cosines; got {cosines.size} numbers")
    row_dir, col_dir = cosines[:3], cosines[3:]
    if not all(np.isclose(np.linalg.norm(v), 1.0, atol=1e-3) for v in (row_dir, col_dir)):
        raise ValueError(f"DICOM orientation cosines are not unit vectors: {cosines.tolist()}")
    normal = np.cross(row_dir, col_dir)
    lps = np.stack([row_dir, col_dir, normal], axis=1)  # columns: x (along a row), y (down a column), z
    to_ras = np.diag([-1.0, -1.0, 1.0])
    return to_ras @ lps, True


def affine_from_spacing(
    spacing_zyx: Sequence[float],
    orientation: Union[None, str, Sequence[float]] = None,
    origin: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """The (4, 4) float64 RAS affine of a (z, y, x) array laid out as (x, y, z); see the module docstring."""
    spacing = np.asarray(spacing_zyx, dtype=np.float64).reshape(-1)
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_zyx must be three positive numbers (mm), got {spacing_zyx!r}")
    rot, origin_lps = _directions(orientation)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing[::-1])  # (sx, sy, sz) on the x, y, z columns
    if origin is not None:
        o = np.asarray(origin, dtype=np.float64).reshape(-1)
        if o.size != 3:
            raise ValueError(f"origin must be three numbers (mm), got {origin!r}")
        affine[:3, 3] = o * np.array([-1.0, -1.0, 1.0]) if origin_lps else o
    return torch.as_tensor(affine, dtype=torch.float64)


def volume_to_metatensor(
    volume_zyx: Union[np.ndarray, torch.Tensor],
    spacing_zyx: Sequence[float],
    orientation: Union[None, str, Sequence[float]] = None,
    origin: Optional[Sequence[float]] = None,
    *,
    meta: Optional[Mapping[str, Any]] = None,
) -> MetaTensor:
    """A (z, y, x) array (or (C, z, y, x)) as a channel-first MetaTensor (C, x, y, z) with its RAS affine.

    The data is transposed (a view where possible), never flipped or resampled, and keeps its dtype
    (int16 HU stays int16). ``volume[z, y, x] == out[0, x, y, z]``. See the module docstring for
    ``orientation`` and ``origin``. ``meta`` entries are added to the tensor's meta dict.
    """
    if isinstance(volume_zyx, MetaTensor):
        volume_zyx = volume_zyx.as_tensor()
    if isinstance(volume_zyx, np.ndarray):
        if volume_zyx.dtype.kind not in "biuf":
            raise TypeError(f"volume must be a numeric array, got dtype {volume_zyx.dtype}")
        if volume_zyx.dtype in (np.uint16, np.uint32, np.uint64):
            volume_zyx = volume_zyx.astype(np.int64)  # torch supports few unsigned ops
        data = torch.from_numpy(np.ascontiguousarray(volume_zyx))
    elif isinstance(volume_zyx, torch.Tensor):
        data = volume_zyx.detach()
    else:
        raise TypeError(f"volume must be a numpy array or torch tensor, got {type(volume_zyx).__name__}")
    if data.ndim == 3:
        data = data.unsqueeze(0)
    if data.ndim != 4:
        raise ValueError(f"volume must be (z, y, x) or (C, z, y, x), got shape {tuple(data.shape)}")
    affine = affine_from_spacing(spacing_zyx, orientation, origin)
    out = MetaTensor(data.permute(0, 3, 2, 1), affine=affine)
    out.meta["original_channel_dim"] = 0
    out.meta["spacing_zyx"] = tuple(float(s) for s in spacing_zyx)
    if meta:
        out.meta.update(dict(meta))
    return out


def metatensor_to_volume(tensor: torch.Tensor) -> np.ndarray:
    """Inverse layout of :func:`volume_to_metatensor`: (C, x, y, z) -> numpy (C, z, y, x)."""
    data = tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)
    if data.ndim != 4:
        raise ValueError(f"expected a channel-first (C, x, y, z) tensor, got shape {tuple(data.shape)}")
    return data.permute(0, 3, 2, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# Small dictionary transforms of our own
# ----------------------------------------------------------------------------------------------------------

class ToChannelFirstMetaTensord(MapTransform):
    """Normalise ``data[key]`` to a channel-first MetaTensor with an affine (first step of the pipelines).

    MetaTensor: kept; 3-D gets a channel axis. numpy array / plain tensor: read as (z, y, x) or
    (C, z, y, x) and converted by :func:`volume_to_metatensor` with ``data["spacing"]`` (or
    ``data[f"{key}_spacing"]``) and optional ``data["orientation"]``/``data["origin"]``. A string path
    is an error here: build the pipeline with ``load=True``.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor):
                if value.ndim == 3:
                    value = value.unsqueeze(0)
                if value.ndim != 4:
                    raise ValueError(f"{key!r}: expected a channel-first (C, i, j, k) MetaTensor, got shape "
                                     f"{tuple(value.shape)}")
                d[key] = value
            elif isinstance(value, (np.ndarray, torch.Tensor)):
                spacing = d.get(f"{key}_spacing", d.get("spacing"))
                if spacing is None:
                    raise KeyError(f"{key!r} is a plain (z, y, x) array: the dict needs its spacing in mm under "
                                   f"'spacing' or '{key}_spacing' (or pass a MetaTensor with an affine)")
                d[key] = volume_to_metatensor(value, spacing, d.get(f"{key}_orientation", d.get("orientation")),
                                              d.get(f"{key}_origin", d.get("origin")))
            elif isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
                raise TypeError(f"{key!r} is a path ({value!r}); build the pipeline with load=True to read files")
            else:
                raise TypeError(f"{key!r} must be a MetaTensor, numpy array, tensor or (with load=True) a path; "
                                f"got {type(value).__name__}")
        return d


class CastHUd(MapTransform):
    """Round to the nearest integer, clip to the int16 range and cast to int16 (raw HU for the fused op)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not isinstance(value, torch.Tensor):
                value = MetaTensor(torch.as_tensor(np.asarray(value)))
            if value.is_floating_point():
                value = torch.round(value).clamp_(_INT16_MIN, _INT16_MAX)
            else:
                value = value.clamp(int(_INT16_MIN), int(_INT16_MAX))
            d[key] = value.to(torch.int16)
        return d


# ----------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------

def window_value(hu: float, window: Sequence[float], out_range: Sequence[float] = (0.0, 1.0)) -> float:
    """What ``ScaleIntensityRange(a_min=lo, a_max=hi, b_min, b_max, clip=True)`` maps ``hu`` to."""
    lo, hi = float(window[0]), float(window[1])
    b_lo, b_hi = float(out_range[0]), float(out_range[1])
    if hi == lo:
        return b_lo
    value = (float(hu) - lo) / (hi - lo) * (b_hi - b_lo) + b_lo
    return float(np.clip(value, min(b_lo, b_hi), max(b_lo, b_hi)))


# Light augmentation: bounds of the draws (see light_augment).
AUGMENT_MAX_SHIFT_VOXELS = 3
AUGMENT_HU_SCALE = (0.97, 1.03)
AUGMENT_HU_OFFSET = (-15.0, 15.0)


def light_augment(volume_zyx: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A lightly augmented copy of a raw (z, y, x) volume, keeping everything a report says true.

    In-plane translation by up to :data:`AUGMENT_MAX_SHIFT_VOXELS` voxels along y and x (the uncovered
    border filled with the background: air for CT, 0 for MR); CT only: HU scaled about air (-1000 HU
    stays air) by a factor in :data:`AUGMENT_HU_SCALE` and offset by :data:`AUGMENT_HU_OFFSET`, as
    calibration differs between scanners. Never flipped (reports name the side) nor moved along z
    (reports and depth targets name the slice). ``kind``: "ct" (int16 HU) or "mr" (float signal).
    Deterministic given ``rng``.
    """
    if kind not in ("ct", "mr"):
        raise ValueError(f"kind must be 'ct' or 'mr', got {kind!r}")
    volume = np.asarray(volume_zyx)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got shape {volume.shape}")
    background = AIR_HU if kind == "ct" else 0.0
    out = np.full(volume.shape, background, dtype=np.float32)
    dy, dx = (int(v) for v in rng.integers(-AUGMENT_MAX_SHIFT_VOXELS, AUGMENT_MAX_SHIFT_VOXELS + 1, 2))
    ny, nx = volume.shape[1:]
    src_y, dst_y = slice(max(0, -dy), ny - max(0, dy)), slice(max(0, dy), ny - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), nx - max(0, dx)), slice(max(0, dx), nx - max(0, -dx))
    out[:, dst_y, dst_x] = volume[:, src_y, src_x]
    if kind == "mr":
        return out.astype(volume.dtype, copy=False)
    scale, offset = rng.uniform(*AUGMENT_HU_SCALE), rng.uniform(*AUGMENT_HU_OFFSET)
    out = (out + 1000.0) * np.float32(scale) - 1000.0 + np.float32(offset)
    return np.clip(np.rint(out), _INT16_MIN, _INT16_MAX).astype(np.int16)


def _check_triple(name: str, value, kind=float):
    if value is None:
        return None
    if np.isscalar(value):
        value = (value,) * 3
    value = tuple(value)
    if len(value) != 3:
        raise ValueError(f"{name} must have three entries (X, Y, Z), got {value!r}")
    if kind is int:
        if any(int(v) != v or v <= 0 for v in value):
            raise ValueError(f"{name} must be positive integers, got {value!r}")
        return tuple(int(v) for v in value)
    if any(not np.isfinite(v) or v <= 0 for v in value):
        raise ValueError(f"{name} must be positive numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _front(keys: Sequence[str], load: bool, reader) -> list:
    if load:
        return [LoadImaged(keys=keys, reader=reader, image_only=True, ensure_channel_first=True)]
    return [ToChannelFirstMetaTensord(keys=keys)]


def _geometry(keys: Sequence[str], orientation: Optional[str], spacing, mode: str) -> list:
    out = []
    if orientation is not None:
        out.append(Orientationd(keys=keys, axcodes=orientation, labels=_RAS_LABELS))
    if spacing is not None:
        out.append(Spacingd(keys=keys, pixdim=spacing, mode=mode, padding_mode="border", dtype=np.float32))
    return out


def ct_transforms(
    *,
    spacing: Optional[Sequence[float]] = (1.5, 1.5, 3.0),
    size: Optional[Sequence[int]] = (96, 96, 64),
    window: Optional[Sequence[float]] = CT_WINDOW,
    out_range: Sequence[float] = (0.0, 1.0),
    orientation: Optional[str] = "RAS",
    keys: Sequence[str] = ("image",),
    as_int16_when_raw: bool = True,
    load: bool = False,
    reader=None,
    pad_hu: float = AIR_HU,
    mode: str = "bilinear",
) -> Compose:
    """CT preprocessing: orient, resample, (optionally) window, pad/crop, cast.

    Steps (dictionary transforms on ``keys``):

    1. ``LoadImaged(ensure_channel_first=True)`` when ``load=True`` (the value is a file path), otherwise
       :class:`ToChannelFirstMetaTensord` (MetaTensor, or (z, y, x) array + ``"spacing"``).
    2. ``Orientationd(axcodes=orientation)`` unless ``orientation`` is None.
    3. ``Spacingd(pixdim=spacing, mode=mode, padding_mode="border")`` (spacing is (X, Y, Z) mm in the
       output orientation) unless ``spacing`` is None; computed in float32.
    4. ``window=(lo, hi)``: ``ScaleIntensityRanged(a_min=lo, a_max=hi, b_min=out_range[0],
       b_max=out_range[1], clip=True)``. ``window=None``: nothing; the volume stays in HU so that
       ``medvl.patch_embed3d(..., window=(lo, hi), out_range=...)`` windows it inside the first layer.
    5. ``ResizeWithPadOrCropd(spatial_size=size, mode="constant", value=pad)`` (symmetric) unless
       ``size`` is None. Pad values: raw, ``pad_hu`` (-1024 HU, air); windowed, the window applied to
       ``pad_hu`` (:func:`window_value`), which is ``out_range[0]`` whenever ``lo >= pad_hu`` (the default
       window gives 0.0). Either way the padded voxels of the raw path, windowed later by the fused op,
       equal those of the windowed path.
    6. Cast: windowed -> float32 (``EnsureTyped``). Raw -> int16 HU (rounded to nearest, clipped to
       [-32768, 32767]) when ``as_int16_when_raw``, else float32 HU.

    The result under each key is a channel-first MetaTensor (C, X, Y, Z) with the updated affine.
    """
    keys = tuple(keys)
    spacing = _check_triple("spacing", spacing)
    size = _check_triple("size", size, int)
    if window is not None:
        window = tuple(float(w) for w in window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"window must be (lo, hi) with lo < hi, got {window!r}")
    out_range = tuple(float(v) for v in out_range)
    if len(out_range) != 2:
        raise ValueError(f"out_range must be (out_lo, out_hi), got {out_range!r}")

    steps = _front(keys, load, reader) + _geometry(keys, orientation, spacing, mode)
    if window is not None:
        steps.append(ScaleIntensityRanged(keys=keys, a_min=window[0], a_max=window[1], b_min=out_range[0],
                                          b_max=out_range[1], clip=True, dtype=np.float32))
        pad = window_value(pad_hu, window, out_range)
    else:
        pad = float(pad_hu)
    if size is not None:
        steps.append(ResizeWithPadOrCropd(keys=keys, spatial_size=size, mode="constant", value=pad))
    if window is None and as_int16_when_raw:
        steps.append(CastHUd(keys=keys))
    else:
        steps.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return Compose(steps)


def mr_transforms(
    *,
    spacing: Optional[Sequence[float]] = (1.0, 1.0, 1.0),
    size: Optional[Sequence[int]] = (128, 128, 96),
    orientation: Optional[str] = "RAS",
    normalize: Optional[str] = "zscore",
    percentiles: Tuple[float, float] = (0.5, 99.5),
    keys: Sequence[str] = ("image",),
    load: bool = False,
    reader=None,
    mode: str = "bilinear",
) -> Compose:
    """MR preprocessing: orient, resample, per-volume intensity normalisation, pad/crop, float32.

    ``normalize="zscore"``: ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` (mean 0, std 1 over
    the nonzero voxels, zeros stay 0). ``normalize="percentile"``: ``ScaleIntensityRangePercentilesd(
    lower, upper, b_min=0, b_max=1, clip=True, channel_wise=True)``. ``None``: no normalisation.
    Padding (``ResizeWithPadOrCropd``) is with 0, the background of both normalisations. Input forms
    and the front step are as for :func:`ct_transforms`.
    """
    keys = tuple(keys)
    spacing = _check_triple("spacing", spacing)
    size = _check_triple("size", size, int)
    steps = _front(keys, load, reader) + _geometry(keys, orientation, spacing, mode)
    if normalize == "zscore":
        steps.append(NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True, dtype=np.float32))
    elif normalize == "percentile":
        lower, upper = (float(p) for p in percentiles)
        steps.append(ScaleIntensityRangePercentilesd(keys=keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0,
                                                     clip=True, channel_wise=True, dtype=np.float32))
    elif normalize is not None:
        raise ValueError(f"normalize must be 'zscore', 'percentile' or None, got {normalize!r}")
    if size is not None:
        steps.append(ResizeWithPadOrCropd(keys=keys, spatial_size=size, mode="constant", value=0.0))
    steps.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return Compose(steps)
