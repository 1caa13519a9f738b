"""Chest radiographs from PNG, JPEG or DICOM files into display-normalised arrays, and those into model input.

Every consumer (training, evaluation, `riha-node generate`, the node's worker) goes through the same two steps:
`load_image` turns a file into a float32 HxW array in [0, 1] where 1 is bright (bone white, as a radiologist sees it),
and `to_model_input` turns that array into the normalised 3-channel tensor the visual backbone was trained on.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from torchvision.transforms import v2

from riha_model.errors import RihaModelError

FRONTAL, LATERAL, OTHER_VIEW = 0, 1, 2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R BT.601 luma weights, as PIL's "L" conversion uses, kept in float here.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Without a window in the file, grey levels outside these percentiles are clipped (burnt-in labels, collimator edges).
ROBUST_PERCENTILES = (0.5, 99.5)

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}

PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG, JPEG or DICOM file as a float32 HxW array in [0, 1], 1 = bright."""
    path = Path(path)
    if not path.is_file():
        raise RihaModelError(f"Image file {path} does not exist; check the path.")
    if is_dicom_file(path):
        return dicom_to_array(read_dicom(path), source=str(path))
    return _load_picture(path)


def is_dicom_file(path: Path) -> bool:
    """A .dcm-like name, or the 'DICM' marker after the 128-byte preamble."""
    return path.suffix.lower() in DICOM_SUFFIXES or pydicom.misc.is_dicom(path)


def read_dicom(path: str | os.PathLike) -> Dataset:
    """Parse a DICOM file, turning pydicom's many failure types into one clear error."""
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise RihaModelError(f"DICOM file {path} cannot be parsed ({exc}); the file is damaged or not DICOM.") from exc


def dicom_to_array(ds: Dataset, source: str = "DICOM data set") -> np.ndarray:
    """First frame of a DICOM image, through the Modality LUT and the VOI LUT or window, MONOCHROME1 inverted.

    Without a VOI LUT or window in the file, the grey levels are stretched between robust percentiles.
    """
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        raise RihaModelError(f"{source} has no pixel data; it is not an image (an SR, a presentation state?).")
    try:
        pixels = pixel_array(ds, index=0)
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise RihaModelError(f"{source} pixel data cannot be decoded ({syntax_name}: {exc}).") from exc

    if pixels.ndim == 3:  # RGB (YBR already converted by pydicom): no grey-level LUTs apply
        bits = int(ds.get("BitsStored", 8))
        return np.clip(pixels.astype(np.float32) @ LUMA_WEIGHTS / (2**bits - 1), 0.0, 1.0)

    try:
        image = _apply_grey_luts(pixels, ds)
    except (ValueError, NotImplementedError, AttributeError, IndexError) as exc:
        raise RihaModelError(f"{source} has an unusable Modality/VOI LUT or window ({exc}).") from exc
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)


def _apply_grey_luts(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> [0, 1]: Modality LUT, then VOI LUT / window scaled by its output range, else percentiles."""
    values = apply_modality_lut(pixels, ds)
    has_voi = bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        # The VOI output range is found by sending both ends of the stored-value range through the same transforms.
        ends = apply_voi_lut(apply_modality_lut(_stored_value_range(ds, pixels.dtype), ds), ds).astype(np.float64)
        low, high = float(ends.min()), float(ends.max())
        values = apply_voi_lut(values, ds)
    else:
        low, high = np.percentile(values, ROBUST_PERCENTILES)
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.float32)
    return np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _stored_value_range(ds: Dataset, dtype: np.dtype) -> np.ndarray:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return np.array([0, 2**bits - 1], dtype=dtype)
    return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=dtype)


def _load_picture(path: Path) -> np.ndarray:
    """PNG / JPEG (8 or 16 bit, grey or colour) -> luminance in [0, 1], EXIF orientation applied."""
    try:
        with Image.open(path) as picture:
            picture = ImageOps.exif_transpose(picture)
            if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.clip(np.asarray(picture, dtype=np.float32) / 65535.0, 0.0, 1.0)
            if picture.mode == "F":
                raise RihaModelError(f"Image {path} holds floating-point pixels; save it as 8 or 16 bit PNG.")
            if picture.mode == "L":
                return np.asarray(picture, dtype=np.float32) / 255.0
            rgb = np.asarray(picture.convert("RGB"), dtype=np.float32)
            return rgb @ LUMA_WEIGHTS / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise RihaModelError(f"Image {path} cannot be read as PNG, JPEG or DICOM ({exc}).") from exc


# View position -------------------------------------------------------------------------------------------------------

FRONTAL_WORDS = {"PA", "AP", "FRONTAL", "POSTERO-ANTERIOR", "ANTERO-POSTERIOR", "POSTEROANTERIOR", "ANTEROPOSTERIOR"}
LATERAL_WORDS = {"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"}
NOT_A_PLAIN_VIEW = re.compile(r"DECUBITUS|OBLIQUE|LORDOTIC|\bRLD\b|\bLLD\b|\bRLO\b|\bLLO\b")


def view_id_of(dataset_or_path: Dataset | str | os.PathLike) -> int:
    """FRONTAL (0), LATERAL (1) or OTHER_VIEW (2) from View Position (0018,5101), else the View Code Sequence, else
    words in the series description or protocol name; decubitus and oblique views are OTHER_VIEW.

    Image Laterality (0020,0062) says which side of a paired organ is shown, not the projection, so it is not used.
    """
    ds = dataset_or_path
    if not isinstance(ds, Dataset):
        try:
            ds = pydicom.dcmread(dataset_or_path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise RihaModelError(f"DICOM file {dataset_or_path} cannot be parsed ({exc}).") from exc

    view_code_meanings = [str(item.get("CodeMeaning", "")) for item in ds.get("ViewCodeSequence", [])]
    for text in (str(ds.get("ViewPosition", "")), *view_code_meanings,
                 str(ds.get("SeriesDescription", "")), str(ds.get("ProtocolName", ""))):
        view = _view_from_text(text)
        if view is not None:
            return view
    return OTHER_VIEW


def file_view_id(path: str | os.PathLike, position: int) -> int:
    """The view of the image at `position` in a study: from the header of a DICOM file; PNG and JPEG carry none,
    so R2Gen's order (the first image frontal, the second lateral, any further one other)."""
    path = Path(path)
    if path.is_file() and is_dicom_file(path):
        return view_id_of(path)
    return min(position, OTHER_VIEW)


def _view_from_text(text: str) -> int | None:
    text = text.upper().strip()
    if not text:
        return None
    if NOT_A_PLAIN_VIEW.search(text):
        return OTHER_VIEW
    words = set(re.split(r"[^A-Z\-]+", text)) | {text}
    lateral = bool(words & LATERAL_WORDS) or "LATERAL" in text
    frontal = bool(words & FRONTAL_WORDS)
    if lateral == frontal:  # neither, or "PA AND LAT" naming a whole series
        return None
    return LATERAL if lateral else FRONTAL


# Model input ---------------------------------------------------------------------------------------------------------

def to_model_input(image: np.ndarray, image_size: int, train: bool = False) -> torch.Tensor:
    """A [0, 1] HxW array -> FloatTensor[3, S, S] normalised with ImageNet statistics.

    R2Gen's transforms scaled to `image_size` S (the reference's 224): for training Resize(S*256/224) (short side),
    RandomCrop(S), RandomHorizontalFlip; for evaluation Resize((S, S)). Random draws use torch's global generator,
    so a seeded run is repeatable.
    """
    if image.ndim != 2:
        raise RihaModelError(f"Expected a grey HxW image array, got shape {tuple(image.shape)}.")
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).unsqueeze(0)
    if train:
        tensor = v2.Resize(round(image_size * 256 / 224), antialias=True)(tensor)
        tensor = v2.RandomCrop(image_size)(tensor)
        tensor = v2.RandomHorizontalFlip()(tensor)
    else:
        tensor = v2.Resize((image_size, image_size), antialias=True)(tensor)
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(tensor.expand(3, -1, -1))
