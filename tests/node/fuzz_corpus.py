"""A deterministic corpus of malformed and hostile DICOM data sets, grown with hypothesis from real chest seeds.

Seeds are real: the SIIM JPEG radiograph, a downsampled copy of pydicom-data's RG1 film (real header and pixels) in
several transfer syntaxes, and phantom CR studies from riha_model.phantoms. Each case is one data set as it travels
in a C-STORE (no preamble, no file meta) with the presentation context and request UIDs it is sent under. The same
code and hypothesis version give the same corpus on every run (derandomized), so a failure can be replayed.
"""
from __future__ import annotations

import hashlib
import struct
import warnings
import zlib
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import pydicom
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, UID)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dsutils import encode, encode_file_meta

from riha_model.phantoms import write_phantoms
from tests.node.samples import SHARED_SC_JPEG, real_file

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SENT_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
                 JPEGBaseline8Bit, JPEG2000Lossless, RLELossless)
LONG_HEADER_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ALL_VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW",
           "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"]
HOSTILE_UIDS = ["../../x", "../../../../tmp/riha-escape", "/etc/passwd", "1.2/../../3", "..", ".", "1..2", "1.2.",
                ".1.2", "1.2.3\\..\\..\\x", "1.2.3/", "~/x", "1.2.3\x00../x", "1.2.3 4", "a" * 64, "9" * 65,
                "1." + "2" * 63, "", " ", "1.2.3\n", "C:\\x", "%2e%2e%2fx", "\u00e9.1"]
SEQUENCE_TAG = 0x00400275  # Request Attributes Sequence: sits before the image module in tag order


@dataclass(frozen=True)
class Seed:
    """One real data set and its facts, with the offsets of its top-level elements for byte-level damage."""

    name: str
    data: bytes
    transfer_syntax: str
    sop_class_uid: str
    uids: dict[str, str]  # StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID
    elements: tuple[tuple[int, int, int, int], ...]  # (tag, start, value start, end) in `data`

    @property
    def explicit(self) -> bool:
        return not UID(self.transfer_syntax).is_implicit_VR

    def dataset(self) -> Dataset:
        """A fresh copy to change attributes on and encode again."""
        syntax = UID(self.transfer_syntax)
        data = zlib.decompress(self.data, -zlib.MAX_WBITS) if syntax.is_deflated else self.data
        return read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)


@dataclass(frozen=True)
class FuzzCase:
    kind: str
    seed: str
    data: bytes
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str  # the C-STORE request's Affected SOP Instance UID

    @property
    def label(self) -> str:
        return f"{self.kind} from {self.seed} ({len(self.data)} bytes, {hashlib.sha256(self.data).hexdigest()[:12]})"

    def part10(self) -> bytes:
        """The case as a file: what the node writes for what it stores, and what a chunked C-STORE reads."""
        meta = Dataset()
        meta.MediaStorageSOPClassUID = self.sop_class_uid
        meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        meta.TransferSyntaxUID = self.transfer_syntax
        meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
        return b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + self.data


def _encode(ds: Dataset, syntax: str) -> bytes:
    """Encoded for `syntax` (compressed syntaxes: explicit VR little endian around the encapsulated pixel data)."""
    syntax = UID(syntax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hostile values are the point
        encoded = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    assert encoded is not None, "pydicom could not encode a fuzz case"
    return encoded


def _element_offsets(data: bytes, syntax: str) -> tuple[tuple[int, int, int, int], ...]:
    syntax = UID(syntax)
    if syntax.is_deflated:
        return ()
    stream = BytesIO(data)
    offsets, start = [], 0
    for element in data_element_generator(stream, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=256):
        end = stream.tell()
        header = 8 if syntax.is_implicit_VR or data[start + 4:start + 6] not in LONG_HEADER_VRS else 12
        offsets.append((int(element.tag), start, start + header, end))
        start = end
    return tuple(offsets)


def make_seed(name: str, ds: Dataset, syntax: str) -> Seed:
    data = _encode(ds, syntax)
    return Seed(name=name, data=data, transfer_syntax=str(syntax), sop_class_uid=str(ds.SOPClassUID),
                uids={k: str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")},
                elements=_element_offsets(data, syntax))


def real_seeds(workdir: Path) -> list[Seed]:
    """The real data sets every case grows from, kept small (the SIIM file is 127 KB, the rest under 40 KB) so that a
    thousand cases travel in about a minute."""
    seeds = []
    siim = pydicom.dcmread(SHARED_SC_JPEG)
    seeds.append(make_seed("siim-jpeg-baseline", siim, siim.file_meta.TransferSyntaxUID))
    film = pydicom.dcmread(real_file("RG1_UNCR.dcm"))
    small = film.pixel_array[::16, ::16].copy()  # the real film, 123x116, real header
    film.Rows, film.Columns = small.shape
    film.PixelData = small.tobytes()
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        seeds.append(make_seed(f"rg1-{syntax.name}", film, syntax))
    for syntax in (JPEG2000Lossless, RLELossless):
        compressed = pydicom.dcmread(real_file("RG1_UNCR.dcm"))
        compressed.Rows, compressed.Columns = small.shape
        compressed.PixelData = small.tobytes()
        compressed.compress(syntax, generate_instance_uid=False)  # the same seed on every run
        seeds.append(make_seed(f"rg1-{syntax.name}", compressed, syntax))
    annotation = write_phantoms(workdir / "phantoms", 3, seed=23, dicom=True, image_size=64)
    for path in sorted((annotation.parent / "dicom").rglob("*.dcm"))[:2]:
        seeds.append(make_seed(f"phantom-{path.parent.name}-{path.stem}", pydicom.dcmread(path),
                               ExplicitVRLittleEndian))
    return seeds


# --- the hostile shapes: each a strategy from a seed to a case -----------------------------------------------------

def _case(kind: str, seed: Seed, data: bytes, **changes) -> FuzzCase:
    return replace(FuzzCase(kind=kind, seed=seed.name, data=data, transfer_syntax=seed.transfer_syntax,
                            sop_class_uid=seed.sop_class_uid, sop_instance_uid=seed.uids["SOPInstanceUID"]),
                   **changes)


def _pick_element(draw, seed: Seed) -> tuple[int, int, int, int]:
    return seed.elements[draw(st.integers(0, len(seed.elements) - 1))]  # seeds without offsets never come here


@st.composite
def truncated(draw, seed: Seed) -> FuzzCase:
    cut = draw(st.integers(0, len(seed.data) - 1))
    return _case("truncated", seed, seed.data[:cut])


@st.composite
def wrong_length(draw, seed: Seed) -> FuzzCase:
    _, start, value_start, _ = _pick_element(draw, seed)
    little = UID(seed.transfer_syntax).is_little_endian
    if value_start - start == 8 and seed.explicit:  # two-byte length field
        field, size = start + 6, draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFE]) | st.integers(0, 0xFFFF))
        packed = struct.pack("<H" if little else ">H", size)
    else:
        field = value_start - 4
        size = draw(st.sampled_from([0, 1, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, len(seed.data) * 2])
                    | st.integers(0, 0xFFFFFFFF))
        packed = struct.pack("<I" if little else ">I", size)
    return _case("wrong length", seed, seed.data[:field] + packed + seed.data[field + len(packed):])


@st.composite
def hostile_uid(draw, seed: Seed) -> FuzzCase:
    keyword = draw(st.sampled_from(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]))
    value = draw(st.sampled_from(HOSTILE_UIDS) | st.text(st.sampled_from("./\\0123456789x\x00~"), max_size=70))
    ds = seed.dataset()
    setattr(ds, keyword, value)
    changes = {}
    if keyword == "SOPInstanceUID" and value.strip() and len(value) <= 64 and value.isascii() \
            and not {"\\", "\x00"} & set(value):  # what pynetdicom can put in a request
        changes["sop_instance_uid"] = value  # the request carries it too, as a hostile sender would
    return _case("hostile UID", seed, _encode(ds, seed.transfer_syntax), **changes)


@st.composite
def huge_declared_size(draw, seed: Seed) -> FuzzCase:
    ds = seed.dataset()
    keyword = draw(st.sampled_from(["Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames",
                                    "BitsStored", "HighBit"]))
    value = draw(st.sampled_from([0, 1, 65535, 2**31 - 1, 64, 33]) | st.integers(0, 65535))
    if keyword == "NumberOfFrames":
        ds.NumberOfFrames = str(value)
    else:
        setattr(ds, keyword, min(value, 65535))
    return _case("huge declared size", seed, _encode(ds, seed.transfer_syntax))


@st.composite
def wrong_vr(draw, seed: Seed) -> FuzzCase:
    if not seed.explicit or not seed.elements:
        return draw(truncated(seed))
    _, start, _, _ = _pick_element(draw, seed)
    vr = draw(st.sampled_from(ALL_VRS).map(str.encode) | st.binary(min_size=2, max_size=2))
    return _case("wrong VR", seed, seed.data[:start + 4] + vr + seed.data[start + 6:])


@st.composite
def undecodable_pixels(draw, seed: Seed) -> FuzzCase:
    """Bytes inside the pixel data overwritten: structure intact, so the SCP stores it and the worker must cope."""
    pixel = [e for e in seed.elements if e[0] == 0x7FE00010]
    if not pixel:
        return draw(byte_noise(seed))
    _, _, value_start, end = pixel[0]
    data = bytearray(seed.data)
    skip = 64 if UID(seed.transfer_syntax).is_compressed else 0  # keep the item tags, break the codestream
    for _ in range(draw(st.integers(1, 40))):
        position = draw(st.integers(value_start + skip, max(end - 9, value_start + skip)))
        chunk = draw(st.binary(min_size=1, max_size=64))
        data[position:position + len(chunk)] = chunk[: max(end - 8 - position, 0)]
    return _case("undecodable pixel data", seed, bytes(data))


@st.composite
def bogus_transfer_syntax(draw, seed: Seed) -> FuzzCase:
    syntax = draw(st.sampled_from([s for s in SENT_SYNTAXES if s != seed.transfer_syntax]))
    data = seed.data
    if draw(st.booleans()) and UID(syntax).is_deflated:
        data = zlib.compress(data)[2:]  # a zlib header where raw deflate belongs: does not inflate the same
    return _case("bogus transfer syntax", seed, data, transfer_syntax=str(syntax))


@st.composite
def sequence_bomb(draw, seed: Seed) -> FuzzCase:
    """Deeply nested or very wide undefined-length sequences, placed where a real sequence would sit."""
    if not seed.explicit or UID(seed.transfer_syntax).is_deflated:
        return draw(hostile_uid(seed))
    little = UID(seed.transfer_syntax).is_little_endian
    tag = struct.pack("<HH" if little else ">HH", SEQUENCE_TAG >> 16, SEQUENCE_TAG & 0xFFFF)
    marker = lambda element: struct.pack("<HHI" if little else ">HHI", 0xFFFE, element, 0)  # noqa: E731
    open_sq = tag + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    open_item = marker(0xE000)[:4] + b"\xff\xff\xff\xff"
    depth, width = draw(st.integers(1, 3000)), draw(st.integers(1, 20000))
    if draw(st.booleans()):
        bomb = (open_sq + open_item) * depth + (marker(0xE00D) + marker(0xE0DD)) * depth
    else:
        bomb = open_sq + (open_item + marker(0xE00D)) * width + marker(0xE0DD)
    if draw(st.booleans()):
        bomb = bomb[: draw(st.integers(0, len(bomb) - 1))]  # a bomb that never closes
    at = next((start for tag_, start, _, _ in seed.elements if tag_ > SEQUENCE_TAG), len(seed.data))
    return _case("sequence bomb", seed, seed.data[:at] + bomb + seed.data[at:])


@st.composite
def not_a_chest(draw, seed: Seed) -> FuzzCase:
    ds = seed.dataset()
    change = draw(st.sampled_from(["modality", "body part", "sop class", "no pixels", "report"]))
    sop_class = seed.sop_class_uid
    if change == "modality":
        ds.Modality = draw(st.sampled_from(["CT", "MR", "US", "NM", "", "cr"]))
    elif change == "body part":
        ds.BodyPartExamined = draw(st.sampled_from(["HAND", "SKULL", "KNEE", "chest", "ABDOMEN"]))
    elif change == "sop class":
        sop_class = ds.SOPClassUID = draw(st.sampled_from([CT_IMAGE_STORAGE, MR_IMAGE_STORAGE]))
    elif change == "no pixels":
        del ds.PixelData
    else:
        sop_class = ds.SOPClassUID = BASIC_TEXT_SR
        del ds.PixelData
    return _case("not a chest radiograph", seed, _encode(ds, seed.transfer_syntax), sop_class_uid=sop_class)


@st.composite
def pixel_length_mismatch(draw, seed: Seed) -> FuzzCase:
    """Pixel data shorter or longer than Rows x Columns x bits say (compressed: a codestream of other dimensions)."""
    ds = seed.dataset()
    if UID(seed.transfer_syntax).is_compressed:
        keyword = draw(st.sampled_from(["Rows", "Columns"]))
        setattr(ds, keyword, draw(st.integers(1, 4096).filter(lambda n: n != ds[keyword].value)))
    elif draw(st.booleans()):
        ds.PixelData = ds.PixelData[: draw(st.integers(0, len(ds.PixelData) // 2 - 1)) * 2]
    else:
        ds.PixelData = ds.PixelData + draw(st.binary(min_size=1, max_size=2048).map(lambda b: b + b[:len(b) % 2]))
    return _case("pixel data length mismatch", seed, _encode(ds, seed.transfer_syntax))


@st.composite
def sop_class_mismatch(draw, seed: Seed) -> FuzzCase:
    other = draw(st.sampled_from([c for c in (CR_IMAGE_STORAGE, CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, DX_IMAGE_STORAGE)
                                  if c != seed.sop_class_uid]))
    request_uid = draw(st.sampled_from(["seed", "other"]))
    changes = {"sop_class_uid": other}
    if request_uid == "other":
        changes["sop_instance_uid"] = "2.25.99"
    return _case("request does not match the data set", seed, seed.data, **changes)


@st.composite
def byte_noise(draw, seed: Seed) -> FuzzCase:
    data = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 12))):
        position = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        chunk = draw(st.binary(min_size=1, max_size=32))
        if edit == "overwrite":
            data[position:position + len(chunk)] = chunk
        elif edit == "insert":
            data[position:position] = chunk
        else:
            del data[position:position + len(chunk)]
    if draw(st.booleans()):
        data += draw(st.binary(min_size=1, max_size=300))  # stray bytes after the last element
    return _case("byte noise", seed, bytes(data))


@st.composite
def reordered_elements(draw, seed: Seed) -> FuzzCase:
    if len(seed.elements) < 3:
        return draw(byte_noise(seed))
    chunks = [seed.data[start:end] for _, start, _, end in seed.elements]
    i = draw(st.integers(0, len(chunks) - 1))
    j = draw(st.integers(0, len(chunks) - 1))
    if draw(st.booleans()):
        chunks[i], chunks[j] = chunks[j], chunks[i]
    else:
        chunks.insert(j, chunks[i])  # the same element twice
    return _case("elements out of order or repeated", seed, b"".join(chunks))


BYTE_LEVEL = {wrong_length, wrong_vr, undecodable_pixels, sequence_bomb, reordered_elements}  # need element offsets
KINDS = (truncated, wrong_length, hostile_uid, huge_declared_size, wrong_vr, undecodable_pixels,
         bogus_transfer_syntax, sequence_bomb, not_a_chest, pixel_length_mismatch, sop_class_mismatch, byte_noise,
         reordered_elements)


def _same_length_uid(original: str, index: int, role: int) -> str:
    """A UID as long as `original`, unique per case and role, so every case is a new instance of a new study."""
    root = f"2.25.{role}."
    room = len(original) - len(root)
    return root + "1" + str(index).zfill(room - 1) if room >= 2 and index < 10 ** (room - 1) else original


def _fresh_identity(case: FuzzCase, seed: Seed, index: int) -> FuzzCase:
    data, request_uid = case.data, case.sop_instance_uid
    for role, keyword in enumerate(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), start=1):
        old = seed.uids[keyword]
        new = _same_length_uid(old, index, role)
        data = data.replace(old.encode(), new.encode())
        if request_uid == old:
            request_uid = new
    return replace(case, data=data, sop_instance_uid=request_uid)


def build_corpus(workdir: Path, per_kind: int = 80) -> list[FuzzCase]:
    """`per_kind` cases of every hostile shape (13 shapes), each a new identity; the same list on every run."""
    seeds = real_seeds(workdir)
    by_name = {seed.name: seed for seed in seeds}
    corpus: list[FuzzCase] = []
    for kind in KINDS:
        usable = [seed for seed in seeds if seed.elements or kind not in BYTE_LEVEL]

        @settings(max_examples=per_kind, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=st.sampled_from(usable).flatmap(kind))
        def collect(case: FuzzCase) -> None:
            corpus.append(case)

        collect()
    return [_fresh_identity(case, by_name[case.seed], index) for index, case in enumerate(corpus)]
