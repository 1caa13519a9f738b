"""Test instances derived from the real chest radiographs: same pixels, new identities or new attributes."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.filereader import read_preamble, _read_file_meta_info
from pydicom.uid import generate_uid

SHARED_SC_JPEG = Path(__file__).resolve().parents[2].parent / "shared/data/dicom/siim_pneumothorax_cr_sc_jpeg.dcm"


def real_file(name: str) -> Path:
    """A file from pydicom-data (RG1_UNCR.dcm, RG1_J2KR.dcm, ...), found offline."""
    return Path(get_testdata_file(name, download=False))


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, without preamble and file meta: what travels in a C-STORE."""
    raw = path.read_bytes()
    stream = io.BytesIO(raw)
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    return raw[stream.tell():]


def dataset_sha256(path: Path) -> str:
    return hashlib.sha256(dataset_bytes(path)).hexdigest()


def derive(source: Path, target: Path, study_uid: str | None = None, **attributes) -> Path:
    """Copy `source` with a new SOP Instance UID (and the given study UID / attributes), keeping its pixels."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if "SOPClassUID" in attributes:
        ds.file_meta.MediaStorageSOPClassUID = attributes["SOPClassUID"]
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target
