"""Phantom studies: deterministic, findings drawn where they belong, reports that say what is drawn, valid DICOM."""

import json
import re
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image

from riha_model.errors import RihaModelError
from riha_model.labeler import label_report
from riha_model.phantoms import FINDINGS, draw_study, write_phantoms

SIZE = 128
LEFT = {"pleural_effusion": "left", "pneumothorax": "left", "nodule": "left", "consolidation": "left"}
LABEL_OF = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
            "nodule": "Lung Lesion", "consolidation": "Consolidation", "support_device": "Support Devices"}


def frontal(seed: int, finding: str) -> np.ndarray:
    return draw_study(np.random.default_rng(seed), [finding], SIZE, sides=LEFT)[0]


def heart_width(image: np.ndarray) -> int:
    """Widest bright run through the midline on rows where the patient's right lung is dark (above the diaphragm)."""
    size, widest = image.shape[0], 0
    for row in image[int(0.3 * size):int(0.85 * size)]:
        lung = np.median(row[int(0.18 * size):int(0.28 * size)])
        if lung > 0.45:
            continue
        threshold = (lung + row[size // 2 - 2:size // 2 + 3].mean()) / 2
        left = right = size // 2
        while left > 0 and row[left - 1] >= threshold:
            left -= 1
        while right < size - 1 and row[right + 1] >= threshold:
            right += 1
        widest = max(widest, right - left + 1)
    return widest


def test_findings_list_and_determinism():
    assert FINDINGS[:6] == ("normal", "cardiomegaly", "pleural_effusion", "pneumothorax", "nodule", "consolidation")
    first = draw_study(np.random.default_rng(4), ["nodule"], SIZE)
    again = draw_study(np.random.default_rng(4), ["nodule"], SIZE)
    other = draw_study(np.random.default_rng(5), ["nodule"], SIZE)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == first[1].shape == (SIZE, SIZE) and first[0].dtype == np.float32
    assert 0.0 <= first[0].min() and first[0].max() <= 1.0
    with pytest.raises(RihaModelError, match="tumour"):
        draw_study(np.random.default_rng(0), ["tumour"], SIZE)


def test_cardiomegaly_widens_the_heart():
    ratios = [heart_width(frontal(seed, "cardiomegaly")) / heart_width(frontal(seed, "normal")) for seed in range(6)]
    assert min(ratios) > 1.1 and np.median(ratios) > 1.35, ratios


def test_findings_change_the_image_where_they_belong():
    for seed in (1, 2):
        normal = frontal(seed, "normal")
        diff = {name: frontal(seed, name) - normal for name in
                ("pleural_effusion", "pneumothorax", "nodule", "consolidation", "support_device")}
        half = SIZE // 2
        # the patient's left is the viewer's right
        effusion = diff["pleural_effusion"]
        assert effusion[int(0.55 * SIZE):int(0.8 * SIZE), half:].mean() > 0.03
        assert abs(effusion[:, :half]).max() < 1e-6
        pneumothorax = diff["pneumothorax"]
        assert pneumothorax[int(0.15 * SIZE):int(0.45 * SIZE), int(0.75 * SIZE):].mean() < -0.015
        assert abs(pneumothorax[:, :half]).max() < 1e-6
        nodule = diff["nodule"]
        assert nodule.max() > 0.2 and (nodule > 0.05).mean() < 0.02
        assert np.unravel_index(nodule.argmax(), nodule.shape)[1] > half
        consolidation = diff["consolidation"]
        assert consolidation[:, half:].sum() > 20 * max(consolidation[:, :half].sum(), 1e-3)
        catheter = diff["support_device"]  # right internal jugular line: upper half, viewer's left of the midline
        assert catheter[:half, :half].sum() > 10 * abs(catheter[half:, :]).sum()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return out, write_phantoms(out, 40, seed=3, dicom=True, image_size=64)


def test_annotation_is_r2gen_layout_with_findings(phantoms):
    out, path = phantoms
    annotation = json.loads(path.read_text())
    assert {name: len(entries) for name, entries in annotation.items()} == {"train": 28, "val": 4, "test": 8}
    for split, entries in annotation.items():
        for entry in entries:
            assert entry["split"] == split
            assert entry["image_path"] == [f"{entry['id']}/0.png", f"{entry['id']}/1.png"]
            assert set(entry["findings"]) <= set(FINDINGS)
            for image in entry["image_path"]:
                with Image.open(out / "images" / image) as png:
                    assert png.mode == "L" and png.size == (64, 64)
    findings = [set(entry["findings"]) for entries in annotation.values() for entry in entries]
    assert {"normal"} in findings and any(len(f - {"support_device"}) == 2 for f in findings)


def test_reports_state_the_drawn_findings_and_negate_the_rest(phantoms):
    _, path = phantoms
    for entries in json.loads(path.read_text()).values():
        for entry in entries:
            labels = label_report(entry["report"])
            positive = {name for name, value in labels.items() if value == 1}
            expected = {LABEL_OF[f] for f in entry["findings"] if f in LABEL_OF}
            if not set(entry["findings"]) - {"normal", "support_device"}:
                expected.add("No Finding")
            assert positive == expected, entry
            for finding, side in entry["sides"].items():
                assert side in entry["report"].lower(), (finding, entry["report"])
            for absent in set(LABEL_OF) - set(entry["findings"]) - {"support_device"}:
                assert labels[LABEL_OF[absent]] == 0, (absent, entry["report"])


def test_same_seed_same_files_other_seed_other_studies(phantoms, tmp_path):
    out, path = phantoms
    again = write_phantoms(tmp_path / "again", 40, seed=3, dicom=True, image_size=64)
    assert again.read_text() == path.read_text()
    study = json.loads(path.read_text())["train"][0]["id"]
    for name in (f"images/{study}/0.png", f"dicom/{study}/1.dcm"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    other = json.loads(write_phantoms(tmp_path / "other", 5, seed=4, image_size=64).read_text())
    assert other["train"][0]["id"].startswith("phantom_4_")
    with pytest.raises(RihaModelError, match="3 or more"):
        write_phantoms(tmp_path / "few", 2)


def test_dicom_studies_are_cr_with_the_right_tags(phantoms):
    out, path = phantoms
    photometric = set()
    for entries in json.loads(path.read_text()).values():
        for entry in entries:
            views = [pydicom.dcmread(out / "dicom" / entry["id"] / f"{n}.dcm") for n in (0, 1)]
            assert [ds.ViewPosition for ds in views] == ["PA", "LL"]
            assert views[0].StudyInstanceUID == views[1].StudyInstanceUID
            assert views[0].SeriesInstanceUID != views[1].SeriesInstanceUID
            for ds, png_path in zip(views, entry["image_path"]):
                assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
                assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
                assert (ds.Modality, ds.BodyPartExamined, ds.BitsAllocated) == ("CR", "CHEST", 16)
                assert str(ds.PatientName).startswith("PHANTOM") and ds.PatientID.startswith("PHANTOM-3-")
                for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
                    assert re.fullmatch(r"[0-9.]{1,64}", uid)
                photometric.add(ds.PhotometricInterpretation)
                pixels = ds.pixel_array.astype(np.float32) / 4095
                if ds.PhotometricInterpretation == "MONOCHROME1":
                    pixels = 1 - pixels
                png = np.asarray(Image.open(out / "images" / png_path), np.float32) / 255
                assert abs(pixels - png).max() < 0.01
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


@pytest.mark.peer
def test_dciodvfy_accepts_the_dicom(phantoms):
    out, _ = phantoms
    files = sorted((out / "dicom").glob("*/*.dcm"))[:4]
    for file in files:
        result = subprocess.run(["dciodvfy", str(file)], capture_output=True, text=True, timeout=60)
        messages = result.stdout + result.stderr
        assert "Error" not in messages and "Warning" not in messages, messages


def test_a_finding_left_out_is_never_drawn_but_still_negated(tmp_path):
    annotation = json.loads(write_phantoms(tmp_path / "no-ptx", 40, seed=3, image_size=32,
                                           without=["pneumothorax"]).read_text())
    entries = [entry for split in annotation.values() for entry in split]
    assert all("pneumothorax" not in entry["findings"] for entry in entries)
    assert any(len(set(entry["findings"]) - {"normal", "support_device"}) == 2 for entry in entries)
    assert all(label_report(entry["report"])["Pneumothorax"] == 0 for entry in entries)
    with pytest.raises(RihaModelError, match="Unknown phantom finding"):
        write_phantoms(tmp_path / "bad", 3, without=["effusion"])
    with pytest.raises(RihaModelError, match="not normal"):
        write_phantoms(tmp_path / "bad", 3, without=["normal"])
