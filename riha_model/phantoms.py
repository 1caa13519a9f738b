"""Synthetic chest radiograph phantoms: drawn frontal and lateral views with known findings, and their reports.

They let tests and the demo train and check the whole loop without patient data. Each study draws a random body
(size, lung height, heart, rotation, exposure, noise) and the findings asked for, in the places a radiologist looks
for them; its report, written in IU-Xray's style, states exactly the drawn findings and negates the others.
Written by hand: no library draws chest radiographs with controllable findings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from riha_model.errors import RihaModelError

FINDINGS: tuple[str, ...] = ("normal", "cardiomegaly", "pleural_effusion", "pneumothorax", "nodule", "consolidation",
                             "support_device")
SIDED = ("pleural_effusion", "pneumothorax", "nodule", "consolidation")
SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


@dataclass
class _Body:
    """Anatomy in image fractions (x across, y down) of a frontal view; the lateral view reuses the heights."""
    half_width: float       # chest wall to midline
    apex: float             # top of the lungs
    base: float             # lowest point of the lungs (costophrenic angles)
    dome: float             # height of the diaphragm domes above the angles
    mediastinum: float      # half width of the upper mediastinum
    heart_ratio: float      # cardiothoracic ratio
    heart_height: float     # half height of the heart
    hilum: float            # height of the hila
    rotation: float         # degrees
    exposure: float         # attenuation scale
    gamma: float
    noise: float
    blur: float             # pixels at 256
    sides: dict[str, str] = field(default_factory=dict)       # finding -> "left" / "right" (the patient's)
    zones: dict[str, str] = field(default_factory=dict)       # finding -> "upper" / "middle" / "lower"


def _sample_body(rng: np.random.Generator, cardiomegaly: bool) -> _Body:
    """A random body; the same number of draws whatever the findings, so the stream stays aligned."""
    return _Body(
        half_width=rng.uniform(0.37, 0.44), apex=rng.uniform(0.12, 0.19), base=rng.uniform(0.72, 0.80),
        dome=rng.uniform(0.06, 0.10),
        mediastinum=rng.uniform(0.055, 0.075),
        heart_ratio=rng.uniform(0.58, 0.66) if cardiomegaly else rng.uniform(0.38, 0.46),
        heart_height=rng.uniform(0.10, 0.13), hilum=rng.uniform(0.38, 0.44), rotation=rng.uniform(-4.0, 4.0),
        exposure=rng.uniform(1.3, 1.9), gamma=rng.uniform(0.8, 1.25), noise=rng.uniform(0.008, 0.025),
        blur=rng.uniform(0.5, 1.1))


def _side_sign(side: str) -> float:
    """Image x direction of a patient side on a PA frontal view: the patient's left is on the viewer's right."""
    return 1.0 if side == "left" else -1.0


def _zone_y(body: _Body, zone: str) -> float:
    top, bottom = body.apex + 0.06, body.base - body.dome - 0.03
    return top + (bottom - top) * {"upper": 0.15, "middle": 0.5, "lower": 0.85}[zone]


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding."""
    if sigma <= 0:
        return image
    radius = max(1, int(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        length = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(k, k + length), axis=axis) for k, w in enumerate(taps))
    return image


def _splat_curve(density: np.ndarray, xs: np.ndarray, ys: np.ndarray, weights: np.ndarray | float) -> None:
    """Add a polyline (coordinates in image fractions) to a density map, one sample per ~half pixel."""
    size = density.shape[0]
    col, row = np.round(xs * (size - 1)).astype(int), np.round(ys * (size - 1)).astype(int)
    keep = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    weights = np.broadcast_to(weights, xs.shape)
    np.add.at(density, (row[keep], col[keep]), weights[keep])


def _curve(start: tuple[float, float], end: tuple[float, float], bend: float, samples: int):
    t = np.linspace(0.0, 1.0, samples)
    xs = start[0] + (end[0] - start[0]) * t
    ys = start[1] + (end[1] - start[1]) * t
    # bend perpendicular to the chord
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = math.hypot(dx, dy) or 1.0
    offset = bend * np.sin(np.pi * t)
    return xs - dy / length * offset, ys + dx / length * offset


def _frontal(body: _Body, findings: set[str], rngs: dict[str, np.random.Generator], size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    dx = x - 0.5
    thorax = body.half_width - 0.04
    density = np.zeros((size, size), np.float32)

    # soft tissue: torso, shoulders, neck, abdomen
    torso = (np.abs(dx) < body.half_width + 0.04 * (y - 0.3)) & (y > 0.08 + 0.25 * (dx / body.half_width) ** 2)
    neck = (np.abs(dx) < 0.09) & (y <= 0.2)
    density[torso | neck] = 0.9

    # lungs, each with a rounded apex and a diaphragm dome; the angle at the chest wall is sharp
    lungs, lung_masks = np.zeros_like(density, bool), {}
    for side in ("right", "left"):
        sign = _side_sign(side)
        across = sign * dx  # 0 at the midline, growing towards this lung's chest wall
        base = body.base - (0.015 if side == "right" else 0.0)
        outer = thorax * np.sqrt(np.clip((y - body.apex) / 0.22, 0, 1))
        inner = body.mediastinum * (1.0 + 0.3 * np.clip((y - 0.3) / 0.3, 0, 1))
        middle, half_span = (inner + thorax) / 2, (thorax - inner) / 2
        diaphragm = base - body.dome * np.clip(1 - ((across - middle) / (half_span + 1e-6)) ** 2, 0, 1) ** 0.7
        mask = (across > inner) & (across < outer) & (y > body.apex) & (y < diaphragm)
        lung_masks[side] = mask
        lungs |= mask
    density[lungs] = 0.18

    # heart: an ellipse low in the chest, reaching further to the patient's left
    heart_half = body.heart_ratio * thorax
    heart_cx, heart_cy = 0.5 + 0.22 * heart_half, body.base - body.dome - body.heart_height * 0.55
    heart = ((x - heart_cx) / heart_half) ** 2 + ((y - heart_cy) / body.heart_height) ** 2 < 1
    mediastinum = (np.abs(dx) < body.mediastinum) & (y > 0.1) & (y < heart_cy)
    density[heart | mediastinum] = np.maximum(density[heart | mediastinum], 1.3)
    trachea = (np.abs(dx + 0.004) < 0.012) & (y > 0.06) & (y < body.hilum - 0.06)
    density[trachea] -= 0.35
    spine = (np.abs(dx) < 0.035) & torso & ~lungs
    density[spine] += 0.12 * (1 + np.sin(np.pi * y[spine] * 26))

    # ribs (posterior arcs) and clavicles
    ribs = np.zeros_like(density)
    for index in range(9):
        level = body.apex + 0.015 + index * (body.base - body.apex) / 9.5
        for side in ("right", "left"):
            sign = _side_sign(side)
            xs, ys = _curve((0.5 + sign * 0.03, level - 0.02), (0.5 + sign * thorax, level + 0.1), -sign * 0.05,
                            size * 2)
            _splat_curve(ribs, xs, ys, 1.0)
    for side in ("right", "left"):
        sign = _side_sign(side)
        xs, ys = _curve((0.5 + sign * 0.04, body.apex + 0.02), (0.5 + sign * (thorax + 0.02), body.apex - 0.03),
                        sign * 0.02, size * 2)
        _splat_curve(ribs, xs, ys, 2.0)
    density += 0.22 * np.clip(_blur(ribs, size / 256 * 1.6), 0, 1) * torso

    # lung markings: vessels fanning out from the hila, fading towards the periphery
    markings = np.zeros_like(density)
    anatomy = rngs["anatomy"]
    for side in ("right", "left"):
        sign = _side_sign(side)
        hilum = (0.5 + sign * (body.mediastinum + 0.03), body.hilum)
        for _ in range(14):
            angle = anatomy.uniform(-1.2, 1.4)  # from up-and-out to down-and-out
            reach = anatomy.uniform(0.12, thorax - body.mediastinum)
            end = (hilum[0] + sign * reach * math.cos(angle * 0.9), hilum[1] + reach * math.sin(angle))
            xs, ys = _curve(hilum, end, anatomy.uniform(-0.03, 0.03), size)
            _splat_curve(markings, xs, ys, np.linspace(1.0, 0.2, size))
    markings = np.clip(_blur(markings, size / 256 * 0.9), 0, 1)

    # findings
    if "pneumothorax" in findings:
        side = body.sides["pneumothorax"]
        sign, across = _side_sign(side), _side_sign(side) * dx
        depth = rngs["pneumothorax"].uniform(0.06, 0.11)  # gap at the apex, narrowing towards the base
        gap = depth * np.clip((body.base - y) / (body.base - body.apex), 0.15, 1)
        edge = thorax * np.sqrt(np.clip((y - body.apex - depth * 0.6) / 0.22, 0, 1)) - gap
        air = lung_masks[side] & (across > edge)
        density[air] = 0.06
        markings[air] = 0
        line = lung_masks[side] & (np.abs(across - edge) < 1.0 / size) & (y > body.apex + depth * 0.6)
        density[line] += 0.5
    density += 0.3 * markings * lungs
    if "pleural_effusion" in findings:
        side = body.sides["pleural_effusion"]
        sign, across = _side_sign(side), _side_sign(side) * dx
        height = rngs["pleural_effusion"].uniform(0.07, 0.16)
        # meniscus: the fluid hides the dome and the costophrenic angle and climbs the chest wall
        surface = body.base - body.dome - height * (0.4 + 0.6 * np.clip(across / thorax, 0, 1) ** 2)
        fluid = (across > body.mediastinum) & (across < thorax + 0.01) & (y > surface) & torso & ~heart
        soft = np.clip((y - surface) / 0.04, 0, 1)
        density[fluid] = np.maximum(density[fluid], 0.18 + 0.8 * soft[fluid])
    if "nodule" in findings:
        side, nodule_rng = body.sides["nodule"], rngs["nodule"]
        sign = _side_sign(side)
        cy = _zone_y(body, body.zones["nodule"])
        cx = 0.5 + sign * nodule_rng.uniform(body.mediastinum + 0.08, thorax - 0.07)
        radius = nodule_rng.uniform(0.022, 0.04)
        distance = np.hypot(x - cx, y - cy) / radius
        density += 0.7 * np.clip(1.2 - distance, 0, 1) ** 0.5
    if "consolidation" in findings:
        side, patch_rng = body.sides["consolidation"], rngs["consolidation"]
        sign = _side_sign(side)
        cy = _zone_y(body, body.zones["consolidation"])
        patch = np.zeros_like(density)
        for _ in range(patch_rng.integers(7, 12)):
            bx = 0.5 + sign * patch_rng.uniform(body.mediastinum + 0.07, thorax - 0.05)
            by = cy + patch_rng.uniform(-0.06, 0.06)
            patch += np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * patch_rng.uniform(0.02, 0.04) ** 2))
        texture = 0.6 + 0.4 * _blur(patch_rng.random((size, size)).astype(np.float32), size / 256 * 2.0)
        density += 0.6 * np.clip(patch, 0, 1) * texture * lung_masks[side]
    if "support_device" in findings:
        # a right internal jugular central venous catheter ending in the superior vena cava
        xs, ys = _curve((0.5 - 0.09, 0.05), (0.5 - body.mediastinum * 0.55, body.hilum - 0.01), -0.02, size * 3)
        line = np.zeros_like(density)
        _splat_curve(line, xs, ys, 1.0)
        density += 0.9 * np.clip(_blur(line, 0.6), 0, 1)
    return density


def _lateral(body: _Body, findings: set[str], rngs: dict[str, np.random.Generator], size: int) -> np.ndarray:
    """Left lateral view: anterior to the viewer's left, spine on the right."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    depth = body.half_width * 0.85  # antero-posterior half depth
    front, back = 0.5 - depth, 0.5 + depth
    density = np.zeros((size, size), np.float32)
    torso = (x > front - 0.02 * np.sin(np.pi * y)) & (x < back) & (y > 0.05)
    density[torso] = 0.9
    lung_front = front + 0.05 + 0.1 * np.clip((body.apex + 0.15 - y) / 0.15, 0, 1)
    lung_back = back - 0.12
    diaphragm = body.base - body.dome * np.clip(np.sin(np.pi * (x - lung_front) / (lung_back - lung_front)), 0, 1)
    # the posterior sulcus is the lowest point of the lungs
    diaphragm += 0.04 * np.clip((x - 0.5) / depth, 0, 1)
    lungs = (x > lung_front) & (x < lung_back) & (y > body.apex) & (y < diaphragm)
    density[lungs] = 0.22
    spine = (x > lung_back) & (x < lung_back + 0.08)
    vertebrae = np.sin(np.pi * y * 22) > -0.6
    density[spine & torso] += np.where(vertebrae, 0.35, 0.1)[spine & torso]
    sternum = (np.abs(x - front - 0.015) < 0.008) & (y > 0.15) & (y < 0.5)
    density[sternum] += 0.3

    heart_half = body.heart_ratio * depth * 0.85
    heart_cx, heart_cy = lung_front + heart_half * 0.9, body.base - body.dome - body.heart_height * 0.6
    heart = ((x - heart_cx) / heart_half) ** 2 + ((y - heart_cy) / (body.heart_height * 1.1)) ** 2 < 1
    density[heart] = np.maximum(density[heart], 0.85)

    if "pleural_effusion" in findings:
        # fluid fills the posterior costophrenic sulcus with a meniscus
        height = rngs["pleural_effusion"].uniform(0.06, 0.12)
        surface = body.base + 0.04 - height * (0.3 + 0.7 * np.clip((x - 0.5) / depth, 0, 1))
        fluid = lungs & (x > 0.5) & (y > surface)
        density[fluid] = 0.95
    if "pneumothorax" in findings:
        apex_air = lungs & (y < body.apex + 0.05)
        density[apex_air] = 0.1
    if "nodule" in findings:
        nodule_rng = rngs["nodule"]
        cy = _zone_y(body, body.zones["nodule"])
        cx = nodule_rng.uniform(lung_front.mean() + 0.1, lung_back - 0.08)
        distance = np.hypot(x - cx, y - cy) / 0.03
        density += 0.5 * np.clip(1.2 - distance, 0, 1) ** 0.5
    if "consolidation" in findings:
        patch_rng = rngs["consolidation"]
        cy = _zone_y(body, body.zones["consolidation"])
        cx = patch_rng.uniform(0.45, 0.6)
        density += 0.45 * np.exp(-((x - cx) ** 2 / 0.008 + (y - cy) ** 2 / 0.004)) * lungs
    if "support_device" in findings:
        xs, ys = _curve((0.5 - 0.02, 0.05), (front + 0.12, body.hilum), 0.02, size * 3)
        line = np.zeros_like(density)
        _splat_curve(line, xs, ys, 1.0)
        density += 0.8 * np.clip(_blur(line, 0.6), 0, 1)
    return density


def _expose(density: np.ndarray, body: _Body, rotation: float, rng: np.random.Generator) -> np.ndarray:
    """Density to a displayed radiograph (bright = dense), with rotation, blur, exposure and noise."""
    size = density.shape[0]
    if rotation:
        density = np.asarray(Image.fromarray(density, "F").rotate(rotation, resample=Image.BILINEAR))
    density = _blur(density, body.blur * size / 256)
    image = 1.0 - np.exp(-body.exposure * np.clip(density, 0, None))
    image = (image / (1.0 - math.exp(-body.exposure * 1.8))) ** body.gamma
    image = image + rng.normal(0.0, body.noise, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _normalise_findings(findings) -> set[str]:
    drawn = set(findings) - {"normal"}
    unknown = drawn - set(FINDINGS)
    if unknown:
        raise RihaModelError(f"Unknown phantom finding(s) {sorted(unknown)}; use names from {FINDINGS}.")
    return drawn


def _draw(rng: np.random.Generator, findings, image_size: int, sides: dict[str, str] | None):
    drawn = _normalise_findings(findings)
    if image_size < 32:
        raise RihaModelError(f"Phantom image size {image_size} is too small to draw a chest; use 32 or more.")
    streams = rng.spawn(3 + len(FINDINGS))
    rngs = {"anatomy": streams[0], "noise": streams[1], "layout": streams[2], **dict(zip(FINDINGS, streams[3:]))}
    body = _sample_body(rngs["anatomy"], "cardiomegaly" in drawn)
    for name in SIDED:
        body.sides[name] = str(rngs["layout"].choice(["left", "right"]))
        body.zones[name] = str(rngs["layout"].choice(["upper", "middle", "lower"]))
    for name, side in (sides or {}).items():
        if name not in SIDED or side not in ("left", "right"):
            raise RihaModelError(f"Cannot put {name!r} on side {side!r}; sides are 'left' or 'right' for {SIDED}.")
        body.sides[name] = side
    frontal = _expose(_frontal(body, drawn, rngs, image_size), body, body.rotation, rngs["noise"])
    lateral = _expose(_lateral(body, drawn, rngs, image_size), body, body.rotation / 2, rngs["noise"])
    return frontal, lateral, body


def draw_study(rng: np.random.Generator, findings, image_size: int = 256,
               sides: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A frontal and a lateral view (float32 HxW in [0, 1], bright = dense) showing the given findings.

    The random stream is split per purpose, so the same generator state draws the same body and noise whatever the
    findings: a study with and without a finding differ only by the finding. `sides` fixes a finding's side (the
    patient's "left" or "right"); otherwise it is drawn.
    """
    frontal, lateral, _ = _draw(rng, findings, image_size, sides)
    return frontal, lateral


# Report wording, in IU-Xray's style: several phrasings per statement.
_ABSENT = {
    "cardiomegaly": ("The heart size is normal.", "Heart size is within normal limits.", "Normal heart size.",
                     "The heart is normal in size.", "The cardiac silhouette is normal in size."),
    "pleural_effusion": ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusion is seen.",
                         "No pleural effusions."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen.",
                     "No evidence of pneumothorax."),
    "nodule": ("No pulmonary nodules.", "No nodules or masses are seen.", "There is no pulmonary nodule."),
    "consolidation": ("No focal consolidation.", "There is no focal airspace consolidation.",
                      "No focal consolidation is seen."),
}
_PRESENT = {
    "cardiomegaly": ("The heart is enlarged.", "Cardiomegaly.", "There is cardiomegaly.",
                     "The cardiac silhouette is enlarged.", "The heart size is enlarged."),
    "pleural_effusion": ("There is a {side} pleural effusion.", "{Side} pleural effusion.",
                         "A {side} pleural effusion is present.", "Small {side} pleural effusion."),
    "pneumothorax": ("There is a {side} pneumothorax.", "{Side} pneumothorax.", "A {side} apical pneumothorax is seen.",
                     "{Side}-sided pneumothorax with a visible pleural edge."),
    "nodule": ("There is a nodule in the {side} {zone} lung.", "{Side} {zone} lung nodule.",
               "A rounded nodule is seen in the {side} {zone} lung zone."),
    "consolidation": ("There is consolidation in the {side} {zone} lung.", "{Side} {zone} lung consolidation.",
                      "Patchy airspace consolidation in the {side} {zone} lung."),
    "support_device": ("A right internal jugular catheter terminates in the superior vena cava.",
                       "Right jugular central venous catheter with tip in the SVC.",
                       "There is a right-sided central venous catheter, tip in the SVC."),
}
_CLEAR_LUNGS = ("The lungs are clear.", "Lungs are clear.", "The lungs are clear bilaterally.")
_BONES = ("No acute bony abnormality.", "The osseous structures are intact.", "Bony structures are unremarkable.")


def _write_report(rng: np.random.Generator, findings, sides: dict[str, str], zones: dict[str, str]) -> str:
    """A findings section stating each drawn finding and negating each absent one, in shuffled order."""
    drawn = _normalise_findings(findings)
    sentences = []
    for name in _PRESENT:
        if name in drawn:
            side, zone = sides.get(name, ""), zones.get(name, "")
            sentences.append(rng.choice(_PRESENT[name]).format(side=side, Side=side.capitalize(), zone=zone))
        elif name in _ABSENT:
            sentences.append(rng.choice(_ABSENT[name]))
    if not drawn & set(SIDED):
        sentences.append(rng.choice(_CLEAR_LUNGS))
    sentences.append(rng.choice(_BONES))
    rng.shuffle(sentences)
    return " ".join(sentences)


def _sample_findings(rng: np.random.Generator, without: set[str]) -> list[str]:
    """About a third of studies normal, the rest one or two pathologies; a catheter in one study of five. Findings in
    `without` are never drawn (the other studies stay exactly as they would be only while `without` is empty)."""
    pathologies = [name for name in FINDINGS if name not in ("normal", "support_device", *without)]
    chosen = [] if rng.random() < 0.35 else list(rng.choice(pathologies, size=rng.choice([1, 2], p=[0.6, 0.4]),
                                                             replace=False))
    if rng.random() < 0.2 and "support_device" not in without:
        chosen.append("support_device")
    return sorted(chosen, key=FINDINGS.index) or ["normal"]


def _to_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(image * 255).astype(np.uint8), "L").save(path)


_VIEWS = (("PA", ["L", "F"], "PA"), ("LL", ["P", "F"], "LATERAL"))  # ViewPosition, PatientOrientation, series


def _write_dicom(folder: Path, views: tuple[np.ndarray, np.ndarray], seed: int, index: int, study_id: str,
                 monochrome1: bool) -> None:
    """One CR study (explicit VR little endian, 12 of 16 bits): a series per view, UIDs derived from the seed."""
    folder.mkdir(parents=True, exist_ok=True)
    entropy = ["riha-node phantom", str(seed), str(index)]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    when = (date(2026, 1, 1) + timedelta(days=index % 365)).strftime("%Y%m%d")
    for number, (image, (view, orientation, description)) in enumerate(zip(views, _VIEWS), start=1):
        sop_uid = generate_uid(entropy_srcs=[*entropy, "instance", view])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = when
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = f"PH{seed % 1000:03d}{index:05d}"
        ds.Modality = "CR"
        ds.Manufacturer = "riha-node phantom generator"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "PHANTOM CHEST 2 VIEWS"
        ds.SeriesDescription = f"PHANTOM {description}"
        ds.PatientName = f"PHANTOM^CHEST{index:05d}"
        ds.PatientID = f"PHANTOM-{seed}-{index:05d}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = view
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series", view])
        ds.StudyID = study_id[-16:]
        ds.SeriesNumber = number
        ds.InstanceNumber = 1
        ds.PatientOrientation = orientation
        ds.BurnedInAnnotation = "NO"
        stored = np.round(image * 4095).astype(np.uint16)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.ImagerPixelSpacing = [f"{400 / stored.shape[0]:.4f}"] * 2
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = ((4095 - stored) if monochrome1 else stored).tobytes()
        dcmwrite(folder / f"{number - 1}.dcm", ds, enforce_file_format=True)


def write_phantoms(out_dir, n_studies: int, seed: int = 0, dicom: bool = False, image_size: int = 256,
                   progress: bool = False, without: Sequence[str] = ()) -> Path:
    """Write n phantom studies: images/<id>/0.png (frontal) and 1.png (lateral), annotation.json in R2Gen's layout
    (train / val / test about 70 / 10 / 20) with the drawn "findings" and their "sides" per study, and with
    dicom=True dicom/<id>/0.dcm and 1.dcm (CR, one in five MONOCHROME1). Returns the annotation path. The same seed
    writes the same files. progress=True shows a bar on a terminal. Findings in `without` never appear (their
    reports still negate them): a model trained on such a set has never seen them, which fine-tuning tests need."""
    if n_studies < 3:
        raise RihaModelError(f"{n_studies} phantom studies cannot fill train, val and test; ask for 3 or more.")
    if "normal" in without:
        raise RihaModelError("Phantoms without a finding can leave out pathologies and support_device, not normal.")
    left_out = _normalise_findings(without)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([seed, 1]).permutation(n_studies)
    n_val, n_test = max(1, round(n_studies * SPLITS[1][1])), max(1, round(n_studies * SPLITS[2][1]))
    split_of = {int(i): ("val" if rank < n_val else "test" if rank < n_val + n_test else "train")
                for rank, i in enumerate(order)}
    annotation: dict[str, list] = {name: [] for name, _ in SPLITS}
    for index in tqdm(range(n_studies), desc="phantom studies", unit="study", disable=None if progress else True):
        study_id = f"phantom_{seed}_{index:05d}"
        rng = np.random.default_rng([seed, 0, index])
        findings = _sample_findings(rng, left_out)
        frontal, lateral, body = _draw(rng, findings, image_size, None)
        report = _write_report(rng, findings, body.sides, body.zones)
        folder = out / "images" / study_id
        folder.mkdir(parents=True, exist_ok=True)
        _to_png(frontal, folder / "0.png")
        _to_png(lateral, folder / "1.png")
        if dicom:
            _write_dicom(out / "dicom" / study_id, (frontal, lateral), seed, index, study_id, rng.random() < 0.2)
        annotation[split_of[index]].append({
            "id": study_id, "report": report, "image_path": [f"{study_id}/0.png", f"{study_id}/1.png"],
            "split": split_of[index], "findings": findings,
            "sides": {name: side for name, side in body.sides.items() if name in findings}})
    path = out / "annotation.json"
    path.write_text(json.dumps(annotation, indent=1))
    return path
