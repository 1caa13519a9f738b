"""`riha-node demo`: the whole loop on this machine, on synthetic phantom studies.

Trains (or reuses) a `tiny` model on phantoms, starts a real `riha-node serve`, a local DICOM receiver standing in
for PACS, pushes phantom CR studies over DICOM, waits for the draft SRs to come back and prints what was drawn next
to what was drafted. The phantoms and the model say nothing clinical: this shows the product working, not a model.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from riha_model.api import PHANTOM_TRAINING, train_model
from riha_model.phantoms import write_phantoms

DEMO_NODE_AE, DEMO_PACS_AE, DEMO_SENDER_AE = "RIHA", "DEMO-PACS", "DEMO-SCU"
DISCLAIMER = ("Demonstration on synthetic phantom images: the model and its drafts are not clinical and say nothing "
              "about real patients.")

TRAIN_STUDIES = 240  # with PHANTOM_TRAINING: the learning test's set, about three CPU-minutes


def free_port_on_loopback() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ReceivedDrafts:
    """The stand-in PACS: keeps every SR it is sent, keyed by StudyInstanceUID."""

    folder: Path
    by_study: dict[str, list[tuple[float, Path]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self.lock:
            self.by_study.setdefault(ds.StudyInstanceUID, []).append((time.monotonic(), path))
        return 0x0000


def run_demo(workdir: Path, studies: int, seed: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    click.echo(DISCLAIMER)
    checkpoint = _trained_model(workdir, seed)
    annotation = write_phantoms(workdir / "studies", max(studies * 5, 5), seed=seed + 1, dicom=True, image_size=256)
    entries = json.loads(annotation.read_text())["test"][:studies]
    received = ReceivedDrafts(workdir / "received")
    received.folder.mkdir(exist_ok=True)
    pacs_port, node_port = free_port_on_loopback(), free_port_on_loopback()
    pacs = AE(ae_title=DEMO_PACS_AE)
    pacs.supported_contexts = AllStoragePresentationContexts
    server = pacs.start_server(("127.0.0.1", pacs_port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, received.handle_store)])
    config = _write_config(workdir, node_port, pacs_port, checkpoint)
    log_file = (workdir / "node.log").open("w")
    node = subprocess.Popen([sys.executable, "-m", "riha_node.cli", "serve", "--config", str(config)],
                            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_listening(workdir / "node.log", node)
        pushed = _push(entries, annotation.parent, node_port)
        rows = _collect(entries, pushed, received, timeout_s=120 + 20 * studies)
    finally:
        node.terminate()
        node.wait(timeout=60)
        server.shutdown()
    _print_table(rows)
    click.echo(f"\nDraft SRs received by the stand-in PACS: {received.folder}\n"
               f"Node storage and database: {workdir / 'storage'}; node log: {workdir / 'node.log'}\n{DISCLAIMER}")


def _trained_model(workdir: Path, seed: int) -> Path:
    checkpoint = workdir / "model" / "phantom-tiny.ckpt"
    if checkpoint.is_file():
        click.echo(f"Reusing the phantom model {checkpoint}")
        return checkpoint
    epochs = PHANTOM_TRAINING["epochs"]
    click.echo(f"Training a tiny model on {TRAIN_STUDIES} phantom studies ({epochs} epochs; a few minutes)")
    image_size = PHANTOM_TRAINING["config_overrides"]["image_size"]
    data = write_phantoms(workdir / "train", TRAIN_STUDIES, seed=seed, image_size=image_size)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    train_model(data, checkpoint, seed=seed, device="cpu", validate_every=epochs // 4, **PHANTOM_TRAINING)
    return checkpoint


def _write_config(workdir: Path, node_port: int, pacs_port: int, checkpoint: Path) -> Path:
    config = workdir / "riha-node.toml"
    config.write_text(textwrap.dedent(f"""\
        # Written by `riha-node demo`.
        [node]
        ae_title = "{DEMO_NODE_AE}"
        port = {node_port}
        storage_dir = "storage"

        [[peers]]
        ae_title = "{DEMO_SENDER_AE}"
        host = "127.0.0.1"

        [pacs]
        ae_title = "{DEMO_PACS_AE}"
        host = "127.0.0.1"
        port = {pacs_port}

        [study]
        quiet_period_s = 2

        [worker]
        device = "cpu"
        batch_size = 4

        [model]
        checkpoint = "{checkpoint}"

        [logging]
        format = "json"
        """))
    return config


def _wait_listening(log_path: Path, node: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while '"event": "listening"' not in log_path.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            raise click.ClickException(f"The demo node did not start; see {log_path}.")
        time.sleep(0.1)


def _push(entries: list[dict], root: Path, node_port: int) -> dict[str, tuple[float, str]]:
    """C-STORE every phantom study to the node; returns StudyInstanceUID -> (time pushed, phantom id)."""
    sender = AE(ae_title=DEMO_SENDER_AE)
    sender.add_requested_context(ComputedRadiographyImageStorage)
    assoc = sender.associate("127.0.0.1", node_port, ae_title=DEMO_NODE_AE)
    if not assoc.is_established:
        raise click.ClickException("The demo node refused the phantom sender's association.")
    pushed = {}
    try:
        for entry in entries:
            files = sorted((root / "dicom" / entry["id"]).glob("*.dcm"))
            for path in files:
                status = assoc.send_c_store(path)
                if getattr(status, "Status", None) != 0x0000:
                    raise click.ClickException(f"The node did not store {path.name} of {entry['id']}.")
            study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
            pushed[study_uid] = (time.monotonic(), entry["id"])
    finally:
        assoc.release()
    click.echo(f"Pushed {len(entries)} phantom studies to {DEMO_NODE_AE} on port {node_port}; waiting for drafts")
    return pushed


def _collect(entries: list[dict], pushed: dict, received: ReceivedDrafts, timeout_s: float) -> list[tuple]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(received.by_study) < len(pushed):
        time.sleep(0.5)
    findings_of = {entry["id"]: entry.get("findings", []) for entry in entries}
    rows = []
    for study_uid, (sent_at, phantom_id) in pushed.items():
        drafts = received.by_study.get(study_uid)
        if not drafts:
            rows.append((phantom_id, findings_of[phantom_id], "(no draft within the time limit)", None))
            continue
        arrived_at, path = drafts[0]
        rows.append((phantom_id, findings_of[phantom_id], _findings_text(pydicom.dcmread(path)), arrived_at - sent_at))
    return rows


FINDING = "121071"  # (121071, DCM, "Finding"): the TEXT items that hold the draft


def _findings_text(sr: pydicom.Dataset) -> str:
    texts = []

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == FINDING:
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return " ".join(texts) or "(empty)"


def _print_table(rows: list[tuple]) -> None:
    click.echo(f"\n{'study':<12} {'drawn findings':<34} {'seconds':>7}  draft")
    for phantom_id, findings, draft, seconds in rows:
        took = f"{seconds:7.1f}" if seconds is not None else "      -"
        click.echo(f"{phantom_id:<12} {', '.join(findings) or 'normal':<34} {took}  {draft}")
