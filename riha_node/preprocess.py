"""From a study's stored instances to the model's input: decode, window, and pick the views the model expects.

Decoding and windowing (Modality LUT, VOI LUT or window, MONOCHROME1 inverted, 8-16 bit, RGB) are riha_model's
`dicom_to_array`, the same function training used, so the worker sees images exactly as the model was trained on.
This module decides which images of a study go in: one frontal (PA preferred to AP) and one lateral, as on IU-Xray;
when no image says its view, the first two in arrival order stand in for frontal and lateral.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom import Dataset

from riha_model.errors import RihaModelError
from riha_model.images import FRONTAL, LATERAL, OTHER_VIEW, dicom_to_array, view_id_of
from riha_node.models import Instance
from riha_node.storage import InstanceStore


class NoUsableImage(Exception):
    """The study holds no image the model can read; the message says why, for `riha-node studies`."""


@dataclass(frozen=True)
class StudyInput:
    images: list[np.ndarray]
    view_ids: list[int]
    sources: list[Dataset]  # headers (no pixels) of every readable chest instance, for the SR's evidence


def _rank(ds: Dataset, view: int) -> tuple[int, int]:
    """Lower is better: a stated view before a guessed one, PA before AP."""
    position = str(ds.get("ViewPosition", "")).upper()
    return (0 if view != OTHER_VIEW else 1, 0 if position in ("PA", "LL", "LATERAL") else 1)


def prepare_study(store: InstanceStore, instances: list[Instance]) -> StudyInput:
    """Decode the study's usable instances and choose up to one frontal and one lateral view.

    Every readable chest instance is a source (the SR references them all); only the chosen views are decoded.
    """
    candidates: list[tuple[Instance, Dataset, int]] = []
    problems: list[str] = []
    for instance in instances:
        if instance.ignored_reason:
            continue
        try:
            header = pydicom.dcmread(store.path(instance.rel_path), stop_before_pixels=True)
            candidates.append((instance, header, view_id_of(header)))
        except BaseException as exc:  # a file damaged on disk: note it and try the others
            problems.append(f"{instance.sop_instance_uid}: cannot be read ({_unreadable(exc)})")
    images, view_ids = [], []
    for instance, _, view in _choose_views(candidates):
        try:
            images.append(dicom_to_array(pydicom.dcmread(store.path(instance.rel_path)),
                                         source=f"instance {instance.sop_instance_uid}"))
            view_ids.append(view)
        except RihaModelError as exc:
            problems.append(str(exc))
        except BaseException as exc:  # hostile pixel data: whatever the reader or a decoder plugin raises
            problems.append(f"instance {instance.sop_instance_uid} cannot be decoded ({_unreadable(exc)})")
    if not images:
        detail = "; ".join(problems) if problems else "no chest radiograph instance in the study"
        raise NoUsableImage(f"no usable image: {detail}")
    return StudyInput(images=images, view_ids=view_ids, sources=[header for _, header, _ in candidates])


def _unreadable(exc: BaseException) -> str:
    """Name what a reader raised on a damaged file; re-raise what is not about the file.

    Decoder plugins written in Rust (pylibjpeg-rle) answer hostile data with a PanicException, which derives from
    BaseException, so catching Exception is not enough to keep a worker alive.
    """
    if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
        raise exc
    return type(exc).__name__


def _choose_views(candidates: list[tuple[Instance, Dataset, int]]) -> list[tuple[Instance, Dataset, int]]:
    frontal = sorted((c for c in candidates if c[2] == FRONTAL), key=lambda c: _rank(c[1], c[2]))
    lateral = sorted((c for c in candidates if c[2] == LATERAL), key=lambda c: _rank(c[1], c[2]))
    if frontal or lateral:
        return frontal[:1] + lateral[:1]
    # No image states a plain frontal or lateral view: R2Gen's order stands in (first frontal, second lateral).
    return [(instance, ds, position) for position, (instance, ds, _) in enumerate(candidates[:2])]
