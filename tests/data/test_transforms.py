"""CT/MR MONAI pipelines and the (z, y, x) numpy -> MetaTensor bridge."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, ScaleIntensityRange

from medvl.data.transforms import (
    AIR_HU,
    ct_transforms,
    metatensor_to_volume,
    mr_transforms,
    volume_to_metatensor,
    window_value,
)


def _chain_text(excinfo):
    """Messages of an exception and its causes (MONAI's Compose wraps transform errors in RuntimeError)."""
    parts, e = [], excinfo.value
    while e is not None:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return " | ".join(parts)


def _ct(shape=(20, 24, 28), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1200, 1600, size=shape, dtype=np.int16)


# ----------------------------------------------------------------------------------------------------------
# volume_to_metatensor
# ----------------------------------------------------------------------------------------------------------

def test_volume_to_metatensor_layout_and_affine():
    vol = _ct()
    mt = volume_to_metatensor(vol, (3.0, 0.8, 0.7))
    assert isinstance(mt, MetaTensor)
    assert mt.shape == (1, 28, 24, 20)  # (C, x, y, z)
    assert mt.dtype == torch.int16
    np.testing.assert_allclose(mt.affine.numpy(), np.diag([0.7, 0.8, 3.0, 1.0]))
    # voxel (z, y, x) of the array is (0, x, y, z) of the tensor
    z, y, x = 5, 7, 11
    assert mt[0, x, y, z].item() == vol[z, y, x]
    # its world position is (x * sx, y * sy, z * sz)
    world = mt.affine.numpy() @ np.array([x, y, z, 1.0])
    np.testing.assert_allclose(world[:3], [x * 0.7, y * 0.8, z * 3.0])
    # pixdim as MONAI reads it from the affine
    np.testing.assert_allclose(mt.pixdim.numpy() if hasattr(mt.pixdim, "numpy") else mt.pixdim, [0.7, 0.8, 3.0])
    # round trip
    np.testing.assert_array_equal(metatensor_to_volume(mt)[0], vol)


def test_volume_to_metatensor_orientation_codes_and_dicom_cosines():
    vol = _ct((4, 5, 6))
    lps = volume_to_metatensor(vol, (2.0, 1.0, 0.5), "LPS", origin=(10.0, 20.0, 30.0))
    np.testing.assert_allclose(lps.affine.numpy(), [[-0.5, 0, 0, 10.0], [0, -1.0, 0, 20.0], [0, 0, 2.0, 30.0],
                                                    [0, 0, 0, 1]])
    # standard axial DICOM: cosines [1,0,0, 0,1,0] in LPS, ImagePositionPatient (LPS) -> RAS origin
    dcm = volume_to_metatensor(vol, (2.0, 1.0, 0.5), (1, 0, 0, 0, 1, 0), origin=(10.0, 20.0, 30.0))
    np.testing.assert_allclose(dcm.affine.numpy(), [[-0.5, 0, 0, -10.0], [0, -1.0, 0, -20.0], [0, 0, 2.0, 30.0],
                                                    [0, 0, 0, 1]])
    # coronal DICOM: rows along patient x (L), columns down toward feet (-z in LPS); normal = row x col
    cor = volume_to_metatensor(vol, (2.0, 1.0, 0.5), (1, 0, 0, 0, 0, -1))
    rot = cor.affine.numpy()[:3, :3]
    np.testing.assert_allclose(rot[:, 0], [-0.5, 0, 0])     # x -> L
    np.testing.assert_allclose(rot[:, 1], [0, 0, -1.0])     # y -> I
    # z along row x col = (1,0,0) x (0,0,-1) = (0,1,0) in LPS (posterior) = (0,-1,0) in RAS
    np.testing.assert_allclose(rot[:, 2], [0, -2.0, 0])
    with pytest.raises(ValueError):
        volume_to_metatensor(vol, (2.0, 1.0, 0.5), "LLS")
    with pytest.raises(ValueError):
        volume_to_metatensor(vol, (2.0, 1.0))
    with pytest.raises(ValueError):
        volume_to_metatensor(vol, (2.0, -1.0, 1.0))
    with pytest.raises(ValueError):
        volume_to_metatensor(vol[0], (2.0, 1.0, 1.0))
    with pytest.raises(TypeError):
        volume_to_metatensor([[1, 2]], (2.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------------------------
# CT
# ----------------------------------------------------------------------------------------------------------

def test_ct_windowed_float32_in_range_and_equal_to_monai_alone():
    vol = _ct()
    data = {"image": vol, "spacing": (3.0, 1.0, 1.0)}
    size = (24, 20, 24)
    out = ct_transforms(window=(-1000.0, 400.0), size=size)(dict(data))["image"]
    assert isinstance(out, MetaTensor)
    assert out.dtype == torch.float32
    assert out.shape == (1, *size)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.min() == 0.0 and out.max() == 1.0  # the data spans the window

    # the same resampling with no window (float HU), then MONAI's ScaleIntensityRange alone
    resampled = ct_transforms(window=None, size=None, as_int16_when_raw=False)(dict(data))["image"]
    assert resampled.dtype == torch.float32
    windowed = ScaleIntensityRange(a_min=-1000.0, a_max=400.0, b_min=0.0, b_max=1.0, clip=True)(resampled)
    unpadded = ct_transforms(window=(-1000.0, 400.0), size=None)(dict(data))["image"]
    assert torch.equal(unpadded.as_tensor(), windowed.as_tensor())
    padded = ResizeWithPadOrCrop(size, mode="constant", value=0.0)(windowed)
    assert torch.equal(out.as_tensor(), padded.as_tensor())


def test_ct_raw_int16_hu_with_air_padding():
    vol = _ct()
    size = (48, 48, 40)  # larger than the resampled (28*1/1.5, 24/1.5, 20*3/3) volume on every axis
    out = ct_transforms(window=None, size=size)({"image": vol, "spacing": (3.0, 1.0, 1.0)})["image"]
    assert out.dtype == torch.int16 and out.shape == (1, *size)
    assert AIR_HU == -1024.0
    # the corners and faces are padding
    assert out[0, 0, 0, 0].item() == -1024 and out[0, -1, -1, -1].item() == -1024
    assert (out[0, :, :, 0] == -1024).all() and (out[0, 0] == -1024).all()
    # the inside is the rounded float resampling
    ref = ct_transforms(window=None, size=size, as_int16_when_raw=False)({"image": vol, "spacing": (3.0, 1.0, 1.0)})
    ref = ref["image"]
    assert ref.dtype == torch.float32
    assert torch.equal(out.as_tensor(), torch.round(ref.as_tensor()).to(torch.int16))
    assert ref.min() >= -1200 and ref.max() <= 1600

    # int16 clipping
    hot = np.full((4, 4, 4), 32000, dtype=np.int16)
    hot_out = ct_transforms(window=None, spacing=None, size=None)({"image": hot.astype(np.float32) * 2,
                                                                      "spacing": (1.0, 1.0, 1.0)})["image"]
    assert hot_out.dtype == torch.int16 and (hot_out == 32767).all()


def test_windowed_pad_matches_window_of_air():
    assert window_value(AIR_HU, (-1000.0, 400.0)) == 0.0
    assert window_value(AIR_HU, (-1000.0, 400.0), (-1.0, 1.0)) == -1.0
    assert window_value(AIR_HU, (-2048.0, 0.0)) == pytest.approx(1024.0 / 2048.0)
    vol = _ct((4, 6, 6))
    out = ct_transforms(spacing=None, window=(-160.0, 240.0), out_range=(-1.0, 1.0), size=(10, 10, 6))(
        {"image": vol, "spacing": (1.0, 1.0, 1.0)})["image"]
    assert out[0, 0, 0, 0].item() == -1.0
    assert out.min() == -1.0 and out.max() == 1.0


@pytest.mark.parametrize("spacing_zyx, pixdim, shape_zyx", [
    ((3.0, 1.0, 1.0), (1.5, 2.0, 1.5), (21, 25, 31)),
    ((2.0, 0.5, 0.75), (1.5, 1.0, 1.0), (16, 33, 21)),
])
def test_spacing_gives_expected_shape(spacing_zyx, pixdim, shape_zyx):
    vol = _ct(shape_zyx)
    out = ct_transforms(spacing=pixdim, size=None)({"image": vol, "spacing": spacing_zyx})["image"]
    in_xyz = shape_zyx[::-1]
    sp_xyz = spacing_zyx[::-1]
    # whole multiples chosen so the extent divides exactly: (n - 1) * s_in / s_out + 1 voxels
    expected = tuple(int(round((n - 1) * s / p)) + 1 for n, s, p in zip(in_xyz, sp_xyz, pixdim))
    assert tuple(out.shape[1:]) == expected
    np.testing.assert_allclose(np.abs(np.diag(out.affine.numpy())[:3]), pixdim)


def test_orientation_ras_from_lps_affine_flips_x_and_y():
    shape_zyx = (6, 7, 8)
    vol = np.zeros(shape_zyx, dtype=np.int16)
    z, y, x = 4, 2, 1
    vol[z, y, x] = 1000
    data = {"image": vol, "spacing": (1.0, 1.0, 1.0), "orientation": "LPS"}
    out = ct_transforms(spacing=None, size=None, window=None)(data)["image"]
    assert out.shape == (1, 8, 7, 6)
    hits = torch.nonzero(out[0] == 1000).tolist()
    # x (L) and y (P) axes reverse to R and A; z (S) stays
    assert hits == [[8 - 1 - x, 7 - 1 - y, z]]
    np.testing.assert_allclose(np.diag(out.affine.numpy())[:3], [1.0, 1.0, 1.0])
    # RAS world position of the marked voxel is unchanged by the reorientation
    before = volume_to_metatensor(vol, (1.0, 1.0, 1.0), "LPS").affine.numpy() @ np.array([x, y, z, 1.0])
    after = out.affine.numpy() @ np.array([*hits[0], 1.0])
    np.testing.assert_allclose(after, before)

    # the same through a MetaTensor input with an LPS-like affine
    mt = MetaTensor(torch.zeros(1, 8, 7, 6), affine=torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0])))
    mt[0, x, y, z] = 500
    out2 = ct_transforms(spacing=None, size=None, window=None, as_int16_when_raw=False)({"image": mt})["image"]
    assert torch.nonzero(out2[0] == 500).tolist() == [[8 - 1 - x, 7 - 1 - y, z]]


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI probing an optional GPU decoder
def test_ct_load_nifti(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = _ct((10, 12, 14))
    mt = volume_to_metatensor(vol, (2.0, 1.0, 1.0))
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(mt[0].numpy(), mt.affine.numpy()), str(path))
    pipe = ct_transforms(load=True, reader="NibabelReader", spacing=None, size=(16, 16, 12), window=None)
    out = pipe({"image": str(path)})["image"]
    assert out.dtype == torch.int16 and out.shape == (1, 16, 16, 12)
    direct = ct_transforms(spacing=None, size=(16, 16, 12), window=None)({"image": vol, "spacing": (2.0, 1.0, 1.0)})
    assert torch.equal(out.as_tensor(), direct["image"].as_tensor())
    with pytest.raises(Exception) as excinfo:
        ct_transforms()({"image": str(path)})
    assert "TypeError" in _chain_text(excinfo) and "load=True" in _chain_text(excinfo)


def test_ct_errors():
    with pytest.raises(ValueError):
        ct_transforms(window=(400.0, -1000.0))
    with pytest.raises(ValueError):
        ct_transforms(size=(96, 96))
    with pytest.raises(ValueError):
        ct_transforms(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(Exception) as excinfo:
        ct_transforms()({"image": _ct((4, 4, 4))})
    assert "KeyError" in _chain_text(excinfo) and "spacing" in _chain_text(excinfo)
    with pytest.raises(Exception) as excinfo:
        ct_transforms()({"image": [[1, 2], [3, 4]]})
    assert "TypeError" in _chain_text(excinfo)


# ----------------------------------------------------------------------------------------------------------
# MR
# ----------------------------------------------------------------------------------------------------------

def _mr(shape=(16, 20, 24), seed=1):
    rng = np.random.default_rng(seed)
    vol = rng.gamma(4.0, 100.0, size=shape).astype(np.float32)
    vol[:, :3] = 0.0  # background
    return vol


def test_mr_zscore_over_nonzero():
    out = mr_transforms(spacing=None, size=None, normalize="zscore")({"image": _mr(), "spacing": (1.0, 1.0, 1.0)})
    img = out["image"]
    assert img.dtype == torch.float32 and img.shape == (1, 24, 20, 16)
    nz = img[img != 0]
    assert abs(nz.mean().item()) < 1e-4
    assert abs(nz.std(unbiased=False).item() - 1.0) < 1e-3
    assert (img[0, :, :3] == 0).all()  # the background stays 0


def test_mr_resampled_and_padded():
    out = mr_transforms(spacing=(2.0, 2.0, 2.0), size=(16, 16, 16), normalize="zscore")(
        {"image": _mr(), "spacing": (2.0, 1.0, 1.0)})["image"]
    assert out.shape == (1, 16, 16, 16) and out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == 0.0  # padding


def test_mr_percentile():
    out = mr_transforms(spacing=None, size=None, normalize="percentile")({"image": _mr(), "spacing": (1.0, 1.0, 1.0)})
    img = out["image"]
    assert img.dtype == torch.float32
    assert img.min().item() == 0.0 and img.max().item() == 1.0
    with pytest.raises(ValueError):
        mr_transforms(normalize="minmax")
