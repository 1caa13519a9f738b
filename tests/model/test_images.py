"""Image loading: real chest DICOM in every transfer syntax, the grey-level pipeline, views, model input."""
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from riha_model.errors import RihaModelError
from riha_model.images import (FRONTAL, IMAGENET_MEAN, IMAGENET_STD, LATERAL, OTHER_VIEW, file_view_id, load_image,
                               to_model_input, view_id_of)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repository
SIIM = SHARED / "dicom" / "siim_pneumothorax_cr_sc_jpeg.dcm"
IU_IMAGES = SHARED / "iu_xray" / "images"


def pydicom_file(name: str) -> str:
    return get_testdata_file(name, download=False)


@pytest.fixture(scope="module")
def rg1_uncompressed() -> np.ndarray:
    return load_image(pydicom_file("RG1_UNCR.dcm"))


def lungs_darker_than_spine(image: np.ndarray) -> bool:
    """On a PA chest film the lung fields are dark and the spine bright (what MONOCHROME1 inversion must keep)."""
    rows, cols = image.shape
    row = int(0.45 * rows)
    lungs = (image[row, int(0.28 * cols)], image[row, int(0.72 * cols)])
    return max(lungs) + 0.2 < image[row, int(0.5 * cols)]


def test_real_chest_dicom_files_load_as_bright_bone_arrays(rg1_uncompressed):
    """RG1 (15-bit MONOCHROME1 CR), its JPEG 2000 lossless copy, and the SIIM JPEG baseline film."""
    j2k = load_image(pydicom_file("RG1_J2KR.dcm"))
    siim = load_image(SIIM)
    for image in (rg1_uncompressed, j2k, siim):
        assert image.dtype == np.float32 and image.ndim == 2
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        assert lungs_darker_than_spine(image)
    assert rg1_uncompressed.shape == (1955, 1841) and siim.shape == (1024, 1024)
    np.testing.assert_array_equal(j2k, rg1_uncompressed)


def test_monochrome1_and_monochrome2_of_the_same_anatomy_give_the_same_array(tmp_path, rg1_uncompressed):
    """RG1 stored inverted as MONOCHROME2 (pixel -> max - pixel, window centre mirrored) reads back the same."""
    ds = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    top = 2**ds.BitsStored - 1
    ds.PixelData = (top - ds.pixel_array).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter = top - float(ds.WindowCenter)
    ds.save_as(tmp_path / "mono2.dcm")
    mono2 = load_image(tmp_path / "mono2.dcm")
    # DICOM's linear window is offset by half a grey level, which mirrors to one level of 1 / (width - 1).
    np.testing.assert_allclose(mono2, rg1_uncompressed, atol=1.5 / (float(ds.WindowWidth) - 1))

    for name, source in (("mono1.dcm", pydicom_file("RG1_UNCR.dcm")), ("mono2_nowindow.dcm", tmp_path / "mono2.dcm")):
        plain = pydicom.dcmread(source)
        del plain.WindowCenter, plain.WindowWidth
        plain.save_as(tmp_path / name)
    # Without a window: robust percentiles, which mirror exactly.
    np.testing.assert_allclose(load_image(tmp_path / "mono2_nowindow.dcm"), load_image(tmp_path / "mono1.dcm"),
                               atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda uid: uid.name)
def test_lossless_transfer_syntaxes_decode_to_the_uncompressed_pixels(tmp_path, syntax):
    ds = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    crop = ds.pixel_array[700:956, 500:756].copy()  # a patch of lung and rib, small enough to encode quickly
    ds.PixelData, (ds.Rows, ds.Columns) = crop.tobytes(), crop.shape
    ds.save_as(tmp_path / "plain.dcm")
    ds.compress(syntax)
    ds.save_as(tmp_path / "compressed.dcm")
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_image(tmp_path / "compressed.dcm"), load_image(tmp_path / "plain.dcm"))


def test_jpeg_lossless_and_colour_dicom_decode():
    lossless = load_image(pydicom_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert lossless.shape == (768, 1024) and lossless.std() > 0.05
    rgb = pydicom.dcmread(pydicom_file("SC_rgb_rle.dcm"))
    expected = rgb.pixel_array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    np.testing.assert_allclose(load_image(pydicom_file("SC_rgb_rle.dcm")), expected, atol=1e-6)


def test_multi_frame_dicom_gives_its_first_frame(tmp_path):
    ds = pydicom.dcmread(pydicom_file("emri_small_jpeg_2k_lossless.dcm"))
    frames = ds.pixel_array
    assert frames.ndim == 3 and not np.array_equal(frames[0], frames[1])
    first = pydicom.dcmread(pydicom_file("emri_small_jpeg_2k_lossless.dcm"))
    first.decompress()
    first.PixelData, first.NumberOfFrames = frames[0].tobytes(), 1
    first.save_as(tmp_path / "first.dcm")
    np.testing.assert_array_equal(load_image(pydicom_file("emri_small_jpeg_2k_lossless.dcm")),
                                  load_image(tmp_path / "first.dcm"))


def test_modality_lut_rescale_applies_before_the_window(tmp_path):
    """A rescaled (slope 2, intercept -100) copy with the window moved to match reads back the same."""
    ds = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    original = load_image(pydicom_file("RG1_UNCR.dcm"))
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter = float(ds.WindowCenter) * 2 - 100
    ds.WindowWidth = (float(ds.WindowWidth) - 1) * 2 + 1
    ds.save_as(tmp_path / "rescaled.dcm")
    np.testing.assert_allclose(load_image(tmp_path / "rescaled.dcm"), original, atol=1e-4)


def test_png_and_jpeg_in_grey_colour_and_16_bit(tmp_path):
    real = load_image(IU_IMAGES / "CXR7_IM-2263" / "0.png")
    assert real.shape == (512, 512) and real.dtype == np.float32 and 0 <= real.min() and real.max() <= 1

    grey = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_allclose(load_image(tmp_path / "grey.png"), grey / 255.0, atol=1e-6)
    Image.fromarray((grey.astype(np.uint16) * 257)).save(tmp_path / "grey16.png")
    np.testing.assert_allclose(load_image(tmp_path / "grey16.png"), grey / 255.0, atol=1e-6)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgb.png"), grey / 255.0, atol=1e-5)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.jpg", quality=95)
    np.testing.assert_allclose(load_image(tmp_path / "rgb.jpg"), grey / 255.0, atol=0.08)


def test_unreadable_files_name_the_file_and_the_reason(tmp_path):
    structured_report = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    structured_report.save_as(tmp_path / "no_pixels.dcm")
    with pytest.raises(RihaModelError, match=r"no_pixels\.dcm has no pixel data"):
        load_image(tmp_path / "no_pixels.dcm")

    damaged = pydicom.dcmread(pydicom_file("RG1_J2KR.dcm"))
    damaged.PixelData = damaged.PixelData[:64] + b"\x00" * 64  # a JPEG 2000 stream cut short
    damaged.save_as(tmp_path / "damaged.dcm")
    with pytest.raises(RihaModelError, match=r"damaged\.dcm pixel data cannot be decoded"):
        load_image(tmp_path / "damaged.dcm")

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(RihaModelError, match=r"notes\.png cannot be read"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(RihaModelError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def _with_view(**elements) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _view_code(meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399348003", "SCT", meaning
    return Sequence([item])


def test_view_ids_from_view_position_view_code_and_description(tmp_path):
    assert view_id_of(SIIM) == FRONTAL
    assert view_id_of(pydicom_file("RG1_UNCR.dcm")) == FRONTAL
    assert view_id_of(_with_view(ViewPosition="AP")) == FRONTAL
    assert view_id_of(_with_view(ViewPosition="LL")) == LATERAL
    assert view_id_of(_with_view(ViewPosition="RL")) == LATERAL
    assert view_id_of(_with_view(ViewPosition="RLD")) == OTHER_VIEW
    assert view_id_of(_with_view(ViewCodeSequence=_view_code("left lateral"))) == LATERAL
    assert view_id_of(_with_view(ViewCodeSequence=_view_code("postero-anterior"))) == FRONTAL
    assert view_id_of(_with_view(ViewCodeSequence=_view_code("left lateral decubitus"))) == OTHER_VIEW
    assert view_id_of(_with_view(SeriesDescription="CHEST LAT")) == LATERAL
    assert view_id_of(_with_view(SeriesDescription="CHEST PA AND LAT")) == OTHER_VIEW
    assert view_id_of(_with_view(ViewPosition="", SeriesDescription="chest")) == OTHER_VIEW
    assert file_view_id(IU_IMAGES / "CXR7_IM-2263" / "1.png", 1) == LATERAL  # PNG: R2Gen's order
    assert file_view_id(SIIM, 1) == FRONTAL  # DICOM: its header wins over the position


def test_model_input_is_normalised_and_training_crops_are_seeded():
    image = np.full((300, 260), 0.5, dtype=np.float32)
    tensor = to_model_input(image, 64)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor.mean((1, 2)), expected)

    gradient = np.tile(np.linspace(0, 1, 260, dtype=np.float32), (300, 1))
    torch.manual_seed(3)
    first = to_model_input(gradient, 64, train=True)
    torch.manual_seed(3)
    assert torch.equal(first, to_model_input(gradient, 64, train=True))
    assert first.shape == (3, 64, 64)
    draws = {to_model_input(gradient, 64, train=True)[0, 0, 0].item() for _ in range(8)}
    assert len(draws) > 1  # random crop and flip do vary
    with pytest.raises(RihaModelError, match="grey HxW"):
        to_model_input(np.zeros((4, 4, 3), np.float32), 64)
