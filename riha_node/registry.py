"""The model registry: every checkpoint the node has run or trained, which one is active, and how it got there.

A registered checkpoint is copied into storage_dir/models/ so the registry owns it: nobody overwriting the file a
config points at can change what a recorded version means. Exactly one version is active at a time; the partial
unique index on `state = 'active'` makes a second one fail at commit, whatever the code path. Activating retires the
active version; `rollback` makes the most recently retired version active again (twice in a row returns to where it
started, like `cd -`).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from riha_model.files import file_sha256
from riha_node.config import Config
from riha_node.db import Database
from riha_node.errors import UserError
from riha_node.log import get_logger
from riha_node.models import ModelVersion, utcnow

log = get_logger(__name__)

MODELS_DIR = "models"
ACTIVE, CANDIDATE, REFUSED, RETIRED = "active", "candidate", "refused", "retired"


class RegistryError(UserError):
    """An operator asked for a version or change the registry cannot give; the message says what to do."""


@dataclass(frozen=True)
class ActiveVersion:
    """What a worker needs to know about the active model: cheap to read between batches."""

    version: str
    sha256: str
    path: Path


def version_path(storage_dir: Path, row: ModelVersion) -> Path:
    return Path(storage_dir) / row.path


def active_version(session: Session, storage_dir: Path) -> ActiveVersion | None:
    row = session.scalars(select(ModelVersion).where(ModelVersion.state == ACTIVE)).first()
    return None if row is None else ActiveVersion(row.version, row.sha256, version_path(storage_dir, row))


def register(session: Session, storage_dir: Path, checkpoint: Path, *, state: str, promoted_by: str | None = None,
             reason: str | None = None, metrics: dict | None = None, data_counts: dict | None = None) -> ModelVersion:
    """Copy the checkpoint into the registry and record it; a checkpoint already registered (same SHA-256) is
    returned as it is. `state=ACTIVE` makes it the active version in this transaction."""
    from riha_model.api import ReportModel  # torch: imported where needed, serve and status read the registry only

    model = ReportModel.load(checkpoint, device="cpu")  # also proves the file is a readable checkpoint
    existing = session.scalars(select(ModelVersion).where(ModelVersion.sha256 == model.sha256)).first()
    if existing is not None:
        return existing
    rel_path = f"{MODELS_DIR}/{model.version}.riha"
    _copy_verified(Path(checkpoint), Path(storage_dir) / rel_path, model.sha256)
    row = ModelVersion(version=model.version, sha256=model.sha256, path=rel_path,
                       parent_sha256=model.metadata.get("parent_sha256"),
                       data_counts=json.dumps(data_counts if data_counts is not None
                                              else model.metadata.get("data_counts")),
                       metrics=json.dumps(metrics if metrics is not None else model.metrics),
                       state=CANDIDATE if state == ACTIVE else state, reason=reason, created_at=utcnow())
    session.add(row)
    session.flush()
    if state == ACTIVE:
        _make_active(session, storage_dir, row, promoted_by or "operator", reason)
    log.info("model registered", model_version=row.version, state=row.state)
    return row


def activate(session: Session, storage_dir: Path, version: str, promoted_by: str,
             reason: str | None = None) -> ModelVersion:
    """Make `version` the active model (the active one is retired); the workers switch at their next batch."""
    row = session.scalars(select(ModelVersion).where(ModelVersion.version == version)).first()
    if row is None:
        raise RegistryError(f"No model version {version!r} in the registry; `riha-node models list` shows them.")
    if row.state == ACTIVE:
        return row
    _make_active(session, storage_dir, row, promoted_by, reason)
    return row


def rollback(session: Session, storage_dir: Path) -> ModelVersion:
    """Make the version that was active before the current one active again."""
    previous = session.scalars(select(ModelVersion).where(ModelVersion.state == RETIRED)
                               .order_by(ModelVersion.retired_at.desc(), ModelVersion.id.desc()).limit(1)).first()
    if previous is None:
        raise RegistryError("No earlier active model version to roll back to; `riha-node models list` shows the "
                            "registry, `riha-node models activate VERSION` picks any version.")
    current = active_version(session, storage_dir)
    reason = f"rollback from {current.version}" if current else "rollback"
    _make_active(session, storage_dir, previous, "operator", reason)
    return previous


def _make_active(session: Session, storage_dir: Path, row: ModelVersion, promoted_by: str,
                 reason: str | None) -> None:
    if not version_path(storage_dir, row).is_file():
        raise RegistryError(f"The checkpoint of {row.version} is missing from the registry's folder ({row.path}); "
                            "register it again or choose another version.")
    now = utcnow()
    for current in session.scalars(select(ModelVersion).where(ModelVersion.state == ACTIVE).with_for_update()):
        current.state, current.retired_at = RETIRED, now
    session.flush()  # the old row leaves `active` before the new one enters it: the unique index holds throughout
    row.state, row.promoted_by, row.promoted_at, row.reason = ACTIVE, promoted_by, now, reason or row.reason
    session.flush()
    log.info("model activated", model_version=row.version, promoted_by=promoted_by)


def ensure_configured(db: Database, config: Config) -> None:
    """Register the configured [model] checkpoint and make it active, unless that exact file is registered already:
    the first version of an empty registry, or a new file an operator configured."""
    checkpoint = config.model.checkpoint
    if checkpoint is None or not checkpoint.is_file():
        return
    sha256 = file_sha256(checkpoint)
    with db.read() as session:
        if session.scalars(select(ModelVersion.id).where(ModelVersion.sha256 == sha256)).first() is not None:
            return
    try:
        with db.session() as session:
            register(session, config.node.storage_dir, checkpoint, state=ACTIVE, promoted_by="config",
                     reason="the configured [model] checkpoint")
    except IntegrityError:  # another process registered it at the same moment: theirs stands
        log.info("configured model registered by another process")


def list_versions(session: Session) -> list[dict]:
    """Every version, newest first, with its evidence: parent, data counts, metrics, state and promotion."""
    rows = session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc()))
    by_sha = {}
    listed = []
    for row in rows:
        by_sha[row.sha256] = row.version
        listed.append(row)
    return [{"version": row.version, "state": row.state, "sha256": row.sha256,
             "parent": by_sha.get(row.parent_sha256, row.parent_sha256), "parent_sha256": row.parent_sha256,
             "data_counts": json.loads(row.data_counts) if row.data_counts else None,
             "metrics": json.loads(row.metrics) if row.metrics else None, "promoted_by": row.promoted_by,
             "promoted_at": row.promoted_at.isoformat() if row.promoted_at else None, "reason": row.reason,
             "path": row.path, "created_at": row.created_at.isoformat()} for row in listed]


def _copy_verified(source: Path, target: Path, sha256: str) -> None:
    """Copy through a temporary file, check the copy's SHA-256, then rename: the registry never holds half a file."""
    if target.is_file() and file_sha256(target) == sha256:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(source, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        if file_sha256(temporary) != sha256:
            raise RegistryError(f"Checkpoint {source} changed while it was copied into the registry; try again.")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
