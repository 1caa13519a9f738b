"""The model registry: the configured checkpoint seeds it, one version is active, activate / rollback switch the
workers between batches, and the SR names the version that wrote it. Also the retrain lock and the gate's rule."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from riha_model.checkpoint import load_checkpoint, save_checkpoint
from riha_model.phantoms import write_phantoms
from riha_node.assembly import close_quiet_studies
from riha_node.config import Config, StudyConfig, load_config
from riha_node.db import Database
from riha_node.ingest import ReceivedInstance, ignored_reason, record_instance
from riha_node.model_runtime import ModelHolder
from riha_node.models import ModelVersion, Report, TaskLock, utcnow
from riha_node.registry import ACTIVE, RETIRED, RegistryError, activate, ensure_configured, register, rollback
from riha_node.retrain import RetrainBusy, RetrainLock, judge
from riha_node.storage import InstanceStore
from riha_node.worker import Worker
from tests.node.peers import open_node

REPO = Path(__file__).resolve().parents[2]


def node_config(folder: Path, checkpoint: Path, extra: str = "", database_url: str = "") -> Config:
    """A node configuration in `folder` (storage there, SQLite unless another database is given, CPU worker) with
    the given [model] checkpoint."""
    path = folder / "riha-node.toml"
    path.write_text(f'[node]\nstorage_dir = "storage"\ndatabase_url = "{database_url}"\n\n'
                    f'[worker]\ndevice = "cpu"\nbatch_size = 8\n'
                    f'poll_interval_s = 0.05\n\n[model]\ncheckpoint = "{checkpoint}"\n\n{extra}')
    return load_config(path, environ={})


def ingest(db: Database, store: InstanceStore, files: list[Path]) -> str:
    """Store one study's DICOM files as the C-STORE handler would and record them; returns the study UID."""
    secret = store.node_secret()
    study_uid = ""
    for path in files:
        ds = pydicom.dcmread(path)
        instance = ReceivedInstance.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
        rel_path = store.relative_path(instance.study_uid, instance.series_uid, instance.sop_instance_uid)
        data = path.read_bytes()
        store.write_durably(rel_path, [data])
        with db.session() as session:
            record_instance(session, instance, reason=ignored_reason(instance, StudyConfig()), rel_path=rel_path,
                            size_bytes=len(data), dataset_sha256=hashlib.sha256(data).hexdigest(),
                            calling_ae="TEST", secret=secret)
        study_uid = instance.study_uid
    return study_uid


def variant(checkpoint: Path, out: Path, note: str) -> Path:
    """The same weights saved with other metadata: a second real checkpoint with its own SHA-256 and version."""
    loaded = load_checkpoint(checkpoint)
    save_checkpoint(out, loaded.model, loaded.config, loaded.tokenizer,
                    metadata={**loaded.metadata, "note": note}, metrics=loaded.metrics)
    return out


def draft_queued_studies(config: Config, db: Database, expected: int, timeout: float = 60.0) -> list[Report]:
    """Queue every received study and run a real worker until `expected` reports exist; returns them."""
    close_quiet_studies(db, 0.0)
    worker, stop = Worker(config), threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with db.read() as session:
                reports = list(session.scalars(select(Report).order_by(Report.id)))
            if len(reports) >= expected:
                return reports
            time.sleep(0.1)
        raise AssertionError(f"{expected} reports expected, {len(reports)} written")
    finally:
        stop.set()
        thread.join()
        worker.db.dispose()


def sr_model_version(store: InstanceStore, report: Report) -> str:
    sr = pydicom.dcmread(store.path(report.rel_path))
    return next(item.SoftwareVersions for item in sr.ContributingEquipmentSequence
                if item.get("ManufacturerModelName") == "RIHA")


@pytest.fixture(scope="module")
def phantom_studies(tmp_path_factory) -> list[list[Path]]:
    folder = tmp_path_factory.mktemp("registry-phantoms")
    write_phantoms(folder, 3, seed=31, dicom=True, image_size=64)
    return [sorted(study.glob("*.dcm")) for study in sorted((folder / "dicom").iterdir())]


def test_configured_checkpoint_becomes_the_first_active_version_owned_by_the_registry(tmp_path, phantom_checkpoint):
    config = node_config(tmp_path, phantom_checkpoint)
    db, _ = open_node(config)
    ensure_configured(db, config)
    ensure_configured(db, config)  # the same file again: nothing new
    with db.read() as session:
        rows = list(session.scalars(select(ModelVersion)))
    assert len(rows) == 1
    row = rows[0]
    assert (row.state, row.promoted_by) == (ACTIVE, "config")
    copy = config.node.storage_dir / row.path
    assert copy.parent == config.node.storage_dir / "models"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == row.sha256 == \
        hashlib.sha256(phantom_checkpoint.read_bytes()).hexdigest()
    assert row.version.startswith("riha-tiny-") and row.version.endswith(row.sha256[:12])
    assert json.loads(row.data_counts)["train"] > 0  # from the checkpoint's training metadata


def test_exactly_one_version_is_active_even_against_a_direct_write(tmp_path, phantom_checkpoint, database_url):
    config = node_config(tmp_path, phantom_checkpoint, database_url=database_url)
    db, _ = open_node(config)
    ensure_configured(db, config)
    second = variant(phantom_checkpoint, tmp_path / "second.riha", "second")
    config_two = node_config(tmp_path, second, database_url=database_url)
    ensure_configured(db, config_two)  # a newly configured file takes over
    with db.read() as session:
        states = {row.sha256: row.state for row in session.scalars(select(ModelVersion))}
    assert sorted(states.values()) == [ACTIVE, RETIRED]
    with pytest.raises(IntegrityError):
        with db.session() as session:
            for row in session.scalars(select(ModelVersion)):
                row.state = ACTIVE
    with db.read() as session:
        assert sorted(row.state for row in session.scalars(select(ModelVersion))) == [ACTIVE, RETIRED]
    db.dispose()


def test_workers_follow_activate_and_rollback_and_the_sr_names_the_version(tmp_path, phantom_checkpoint,
                                                                         phantom_studies):
    config = node_config(tmp_path, phantom_checkpoint)
    db, store = open_node(config)
    holder = ModelHolder(config, db)
    first = holder.current().version
    second_file = variant(phantom_checkpoint, tmp_path / "second.riha", "site")
    with db.session() as session:
        second = register(session, config.node.storage_dir, second_file, state="candidate").version
    assert holder.current().version == first  # a candidate is not used

    with db.session() as session:
        activate(session, config.node.storage_dir, second, promoted_by="operator")
    assert holder.current().version == second  # switched without a restart
    ingest(db, store, phantom_studies[0])
    [report] = draft_queued_studies(config, db, expected=1)
    assert report.model_version == second == sr_model_version(store, report)

    with db.session() as session:
        assert rollback(session, config.node.storage_dir).version == first
    ingest(db, store, phantom_studies[1])
    reports = draft_queued_studies(config, db, expected=2)
    assert reports[-1].model_version == first == sr_model_version(store, reports[-1])
    with db.read() as session:
        rows = {row.version: row for row in session.scalars(select(ModelVersion))}
    assert (rows[first].state, rows[first].promoted_by, rows[second].state) == (ACTIVE, "operator", RETIRED)
    assert rows[first].reason == f"rollback from {second}"


def run_cli(config: Config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "riha_node.cli", *args, "--config", str(config.source)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.slow
def test_models_command_lists_activates_and_rolls_back(tmp_path, phantom_checkpoint):
    second = variant(phantom_checkpoint, tmp_path / "second.riha", "second")
    config = node_config(tmp_path, phantom_checkpoint)
    db, _ = open_node(config)
    ensure_configured(db, config)
    with db.session() as session:
        second_version = register(session, config.node.storage_dir, second, state="candidate").version

    listed = run_cli(config, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["version"]: row for row in json.loads(listed.stdout)}
    assert rows[second_version]["state"] == "candidate"
    assert rows[second_version]["data_counts"]["train"] > 0

    unknown = run_cli(config, "models", "activate", "riha-tiny-000000000000")
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1 and "No model version 'riha-tiny-000000000000'" in unknown.stderr
    assert run_cli(config, "models", "activate", second_version).stdout.strip() == f"active model: {second_version}"
    back = run_cli(config, "models", "rollback")
    assert back.returncode == 0 and "rollback from " + second_version in back.stdout
    table = run_cli(config, "models", "list").stdout
    assert "active" in table and "retired" in table and "promoted  by operator" in table


def test_models_commands_read_the_registry_without_loading_torch(tmp_path, phantom_checkpoint):
    """An operator's `models list` takes under a second; loading torch would take several."""
    config = node_config(tmp_path, phantom_checkpoint)
    db, _ = open_node(config)
    ensure_configured(db, config)
    db.dispose()
    code = ("import sys\nfrom click.testing import CliRunner\nfrom riha_node.cli import main\n"
            f"result = CliRunner().invoke(main, ['models', 'list', '--config', {str(config.source)!r}])\n"
            "assert result.exit_code == 0, result.output\nprint('torch' in sys.modules)")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ran.stdout.strip() == "False", ran.stderr


def test_rollback_with_no_earlier_version_says_so(tmp_path, phantom_checkpoint):
    config = node_config(tmp_path, phantom_checkpoint)
    db, _ = open_node(config)
    ensure_configured(db, config)
    with pytest.raises(RegistryError, match="No earlier active model version"):
        with db.session() as session:
            rollback(session, config.node.storage_dir)


def test_retrain_lock_is_exclusive_and_freed_when_its_holder_is_gone(engine_database):
    with RetrainLock(engine_database, 60):
        with pytest.raises(RetrainBusy, match="Another retrain"):
            with RetrainLock(engine_database, 60):
                pass
    with engine_database.read() as session:
        assert session.get(TaskLock, "retrain") is None  # released on exit

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with engine_database.session() as session:  # a holder on this host that was killed: its pid is gone
        session.add(TaskLock(name="retrain", owner=f"{os.uname().nodename}:{dead.pid}", acquired_at=utcnow(),
                             expires_at=utcnow() + timedelta(hours=1)))
    with RetrainLock(engine_database, 60) as lock:
        with engine_database.read() as session:
            assert session.get(TaskLock, "retrain").owner == lock.owner

    with engine_database.session() as session:  # a holder on another host: only its expiry frees the lock
        session.add(TaskLock(name="retrain", owner="elsewhere:1", acquired_at=utcnow(),
                             expires_at=utcnow() + timedelta(hours=1)))
    with pytest.raises(RetrainBusy):
        with RetrainLock(engine_database, 60):
            pass
    with engine_database.session() as session:
        session.get(TaskLock, "retrain").expires_at = utcnow() - timedelta(seconds=1)
    with RetrainLock(engine_database, 60):
        pass


def scores(micro_f1: float, bleu_4: float) -> dict:
    return {"BLEU_4": bleu_4, "clinical_efficacy": {"micro_f1": micro_f1, "macro_f1": micro_f1}}


@pytest.mark.parametrize(("candidate", "active", "margin", "promoted"), [
    (scores(0.50, 0.1), scores(0.40, 0.2), 0.0, True),     # better on the metric, whatever BLEU-4 says
    (scores(0.38, 0.3), scores(0.40, 0.2), 0.05, True),    # worse, but within the margin
    (scores(0.30, 0.3), scores(0.40, 0.2), 0.05, False),   # worse beyond the margin
    (scores(0.40, 0.1), scores(0.40, 0.2), 0.0, False),    # tied: BLEU-4 breaks it
    (scores(0.40, 0.2), scores(0.40, 0.2), 0.0, True),     # tied on both: no worse
])
def test_gate_rule(candidate, active, margin, promoted):
    decision, reason = judge(candidate, active, "micro_f1", margin)
    assert decision is promoted
    assert reason.startswith("promoted" if promoted else "refused") and "micro_f1" in reason
