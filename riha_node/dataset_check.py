"""Read a received data set strictly enough to refuse truncated or garbage data.

pydicom reads leniently by design: a value cut short is returned short, and a half element header at the end is
dropped silently. A receiver that must never acknowledge a damaged instance needs the opposite, so this walks the
top-level elements once and checks that every defined length was present in full and that nothing is left over.
Large values are checked by their offsets, not read, so a 7 MB image is not copied to be checked.
"""
from __future__ import annotations

import zlib
from io import BytesIO

from pydicom import Dataset
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.uid import UID

UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 4096  # larger values (pixel data) are skipped by offset, never copied


class DamagedDataSet(ValueError):
    """The bytes are not one complete DICOM data set in the negotiated transfer syntax."""


def read_received(data: bytes, transfer_syntax: str) -> Dataset:
    """Parse the header and check the structure; pixel data is neither copied nor decoded (the worker decodes)."""
    syntax = UID(transfer_syntax)
    if syntax == "1.2.840.10008.1.2.1.99":  # Deflated Explicit VR Little Endian
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise DamagedDataSet(f"deflated data set does not inflate ({exc})") from None
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    _check_complete(data, implicit, little)
    try:
        return read_dataset(BytesIO(data), implicit, little, defer_size=DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types on hostile input; each is the same answer to the peer
        raise DamagedDataSet(f"data set cannot be parsed ({type(exc).__name__})") from None  # its text may hold PHI


def _check_complete(data: bytes, implicit: bool, little: bool) -> None:
    if not data:
        raise DamagedDataSet("empty data set")
    stream = BytesIO(data)
    end_of_last = 0
    try:
        for element in data_element_generator(stream, implicit, little, defer_size=DEFER_BYTES):
            length = getattr(element, "length", UNDEFINED_LENGTH)  # parsed sequences carry no raw length
            value = getattr(element, "value", None)
            if length != UNDEFINED_LENGTH and isinstance(value, bytes) and len(value) != length:
                raise DamagedDataSet(f"element {element.tag} declares {length} bytes but {len(value)} arrived")
            end_of_last = stream.tell()  # past a deferred value this may lie beyond the data: caught below
    except DamagedDataSet:
        raise
    except Exception as exc:
        raise DamagedDataSet(f"data set cannot be parsed ({type(exc).__name__})") from None  # its text may hold PHI
    if end_of_last != len(data):
        raise DamagedDataSet(f"data set does not end on an element boundary ({len(data)} bytes, the last element "
                             f"ends at {end_of_last})")
