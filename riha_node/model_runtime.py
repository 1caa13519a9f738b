"""The worker's model: loaded once per process, reloaded when the configured checkpoint file changes.

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
from riha_node.log import get_logger
from riha_node.preprocess import StudyInput
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
    def __init__(self, config: Config):
        self.config = config
        self.active: ActiveModel | None = None
        self._loaded_stamp: tuple | None = None
        self._warned_missing = False

    def current(self) -> ActiveModel | None:
        """The model to use now; None (logged once) when no usable checkpoint is configured."""
        path = self.config.model.checkpoint
        if path is None:
            self._warn_once("no model configured", hint="set [model] checkpoint in the configuration")
            return None
        stamp = _stamp(path)
        if stamp is None:
            self._warn_once("checkpoint missing", checkpoint=str(path))
            return None
        if stamp != self._loaded_stamp:
            try:
                self.active = ActiveModel(ReportModel.load(path, device=self.config.worker.device))
            except RihaModelError as exc:
                self._warn_once("checkpoint not loaded", checkpoint=str(path), error=str(exc))
                return self.active
            self._loaded_stamp = stamp
            self._warned_missing = False
            log.info("model loaded", model_version=self.active.version, checkpoint=str(path))
        return self.active

    def _warn_once(self, event: str, **details) -> None:
        if not self._warned_missing:
            log.warning(event, **details)
            self._warned_missing = True


def _stamp(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
