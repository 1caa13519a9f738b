"""The worker's model: the model registry's active version, loaded once per process and switched between batches.

The node talks to riha_model only through `riha_model.api.ReportModel` (load a checkpoint; turn a batch of studies'
pixel arrays into report texts).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from riha_model.api import ReportModel
from riha_model.errors import RihaModelError
from riha_node import __version__
from riha_node.config import Config
from riha_node.db import Database
from riha_node.log import get_logger
from riha_node.preprocess import StudyInput
from riha_node.registry import active_version, ensure_configured
from riha_node.sr import AlgorithmInfo

log = get_logger(__name__)


def model_uid(sha256: str) -> str:
    """A DICOM UID naming one checkpoint: the 2.25 root with the first 128 bits of its SHA-256 (PS3.5 B.2)."""
    return f"2.25.{int(sha256[:32], 16)}"


@dataclass
class ActiveModel:
    report_model: ReportModel

    @property
    def version(self) -> str:
        return self.report_model.version

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo(name="RIHA", version=self.version, model_uid=model_uid(self.report_model.sha256),
                             software_version=__version__)

    def generate(self, studies: list[StudyInput]) -> list[str]:
        return self.report_model.generate_reports([s.images for s in studies], [s.view_ids for s in studies])


class ModelHolder:
    """The worker's model: the registry's active version, checked between batches (one small query) and loaded
    when it changes. A batch already handed its model finishes with it, so a switch never drops a study in flight.

    The configured [model] checkpoint seeds the registry: registered and made active when that exact file is not
    registered yet (the first start, or an operator configuring a new file; checked when the file changes).
    """

    def __init__(self, config: Config, db: Database):
        self.config = config
        self.db = db
        self.active: ActiveModel | None = None
        self._configured_stamp: tuple | None = None
        self._warned: str | None = None

    def current(self) -> ActiveModel | None:
        """The model to use now; None (logged once) when the registry has no usable active version."""
        self._follow_configured_file()
        with self.db.read() as session:
            wanted = active_version(session, self.config.node.storage_dir)
        if wanted is None:
            self._warn_once("no model configured", hint="set [model] checkpoint in the configuration or "
                                                        "`riha-node models activate VERSION`")
            return None
        if self.active is None or self.active.report_model.sha256 != wanted.sha256:
            try:
                loaded = ActiveModel(ReportModel.load(wanted.path, device=self.config.worker.device))
            except RihaModelError as exc:
                self._warn_once("active model not loaded", model_version=wanted.version, error=str(exc))
                return self.active
            previous, self.active, self._warned = self.active, loaded, None
            log.info("model loaded", model_version=loaded.version,
                     replaced=previous.version if previous else None)
        return self.active

    def _follow_configured_file(self) -> None:
        path = self.config.model.checkpoint
        stamp = _stamp(path) if path is not None else None
        if stamp is not None and stamp != self._configured_stamp:
            self._configured_stamp = stamp  # a file that cannot be read is tried again only when it changes
            try:
                ensure_configured(self.db, self.config)
            except RihaModelError as exc:
                self._warn_once("checkpoint not loaded", checkpoint=str(path), error=str(exc))

    def _warn_once(self, event: str, **details) -> None:
        if self._warned != event:
            log.warning(event, **details)
            self._warned = event


def _stamp(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
