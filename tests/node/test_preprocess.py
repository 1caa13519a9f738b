"""Choosing and decoding a study's images for the model, with the real chest files in every transfer syntax."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from riha_node.models import Instance
from riha_node.preprocess import NoUsableImage, prepare_study
from riha_node.storage import InstanceStore
from tests.node.samples import SHARED_SC_JPEG, derive, real_file


def stored(store: InstanceStore, *files: Path, ignored: str | None = None) -> list[Instance]:
    instances = []
    for number, path in enumerate(files):
        rel = f"studies/1.2/1.3/{number}.dcm"
        store.path(rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, store.path(rel))
        instances.append(Instance(sop_instance_uid=f"1.2.3.{number}", rel_path=rel, ignored_reason=ignored))
    return instances


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "SIIM"])
def test_uncompressed_jpeg2000_and_jpeg_baseline_decode(tmp_path, name):
    store = InstanceStore(tmp_path)
    prepared = prepare_study(store, stored(store, SHARED_SC_JPEG if name == "SIIM" else real_file(name)))
    (image,) = prepared.images
    assert image.dtype == np.float32 and image.ndim == 2 and 0.0 <= image.min() < image.max() <= 1.0
    assert prepared.view_ids == [0]  # all three are PA chest films


def test_frontal_and_lateral_are_chosen_and_every_readable_instance_is_a_source(tmp_path):
    store = InstanceStore(tmp_path)
    lateral = derive(real_file("RG1_UNCR.dcm"), tmp_path / "lat.dcm", ViewPosition="LL")
    ap = derive(real_file("RG1_UNCR.dcm"), tmp_path / "ap.dcm", ViewPosition="AP")
    prepared = prepare_study(store, stored(store, ap, lateral, real_file("RG1_UNCR.dcm")))
    assert sorted(prepared.view_ids) == [0, 1]
    assert len(prepared.sources) == 3
    assert all("PixelData" not in source for source in prepared.sources)


def test_a_study_of_only_a_lateral_view_is_used_as_lateral(tmp_path):
    store = InstanceStore(tmp_path)
    lateral = derive(real_file("RG1_UNCR.dcm"), tmp_path / "lat.dcm", ViewPosition="LL")
    assert prepare_study(store, stored(store, lateral)).view_ids == [1]


def test_without_view_information_the_arrival_order_stands_in(tmp_path):
    store = InstanceStore(tmp_path)
    files = [derive(real_file("RG1_UNCR.dcm"), tmp_path / f"{i}.dcm", ViewPosition="") for i in range(3)]
    assert prepare_study(store, stored(store, *files)).view_ids == [0, 1]


def test_monochrome1_and_monochrome2_give_the_same_model_input(tmp_path):
    store = InstanceStore(tmp_path)
    source = real_file("RG1_UNCR.dcm")  # MONOCHROME1
    ds = pydicom.dcmread(source)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    pixels, top = ds.pixel_array, 2 ** ds.BitsStored - 1
    # The same film stored the other way round: values mirrored, and the window with them.
    inverted = derive(source, tmp_path / "m2.dcm", PhotometricInterpretation="MONOCHROME2",
                      PixelData=(top - pixels).astype(pixels.dtype).tobytes(),
                      WindowCenter=top - float(ds.WindowCenter))
    first = prepare_study(store, stored(store, source)).images[0]
    second = prepare_study(InstanceStore(tmp_path / "b"), stored(InstanceStore(tmp_path / "b"), inverted)).images[0]
    assert np.abs(first - second).mean() < 0.02


def test_no_usable_image_names_why(tmp_path):
    store = InstanceStore(tmp_path)
    with pytest.raises(NoUsableImage, match="no chest radiograph instance"):
        prepare_study(store, stored(store, real_file("RG1_UNCR.dcm"), ignored="modality CT is not one of CR, DX"))
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(NoUsableImage, match="cannot be read"):
        prepare_study(store, stored(store, tmp_path / "junk.dcm"))
