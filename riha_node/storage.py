"""Where received instances live on disk, and how they get there without ever being half-written.

Layout: <storage_dir>/studies/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm. A UID becomes a path
component only after `valid_uid` accepted it, so a hostile UID such as "../../x" never reaches the file system.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import threading
from pathlib import Path

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TEMP_SUFFIX = ".partial"
OWNER_ONLY_UMASK = 0o077


def valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, no empty component, at most 64 characters (PS3.5 9.1)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


class InstanceStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.studies = self.root / "studies"

    def prepare(self) -> None:
        """Make this process's files owner-only, create the folders, and remove temp files a crash left behind.

        `serve` calls this first thing, so the umask also covers the database and whatever the workers it starts
        create. The root may already exist (the database engine creates its folder): it is made owner-only too,
        which alone keeps everything below it from other users.
        """
        owner_only_files()
        for folder in (self.root, self.studies):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.stat().st_uid == os.getuid():
            self.root.chmod(0o700)
        for leftover in self.studies.rglob(f"*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)

    def node_secret(self) -> bytes:
        """This node's random key (created once, owner-only) for pseudonymising patient IDs."""
        key_file = self.root / "node.key"
        try:
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return key_file.read_bytes()
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(self.root)
        return key_file.read_bytes()

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        for uid in (study_uid, series_uid, sop_instance_uid):
            if not valid_uid(uid):
                raise ValueError("not a valid UID")
        return f"studies/{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def path(self, rel_path: str) -> Path:
        return self.root / rel_path

    def write_durably(self, rel_path: str, chunks: list[bytes]) -> None:
        """Temp file in the target folder, fsync, atomic rename, fsync the folder: all of it, or nothing, survives."""
        target = self.root / rel_path
        folder = target.parent
        temp = folder / f"{target.name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"
        created = _makedirs_durably(folder, self.root)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:  # retention removed the folder, emptied, in between: make it again
            created = _makedirs_durably(folder, self.root)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=True) as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
        for parent in created:
            _fsync_dir(parent)

    def write_dataset(self, rel_path: str, ds) -> None:
        """A data set the node made (a draft SR), as a Part 10 file, with the same durability as received ones."""
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        self.write_durably(rel_path, [buffer.getvalue()])

    def remove(self, rel_path: str) -> None:
        target = self.root / rel_path
        target.unlink(missing_ok=True)
        _fsync_dir(target.parent)

    def remove_empty_folders(self, rel_folder: str) -> None:
        """Remove `rel_folder` and every folder under it that holds no file: retention empties a study's folders,
        and millions of empty ones would slow every start (`prepare` walks them)."""
        for folder, _, _ in os.walk(self.root / rel_folder, topdown=False):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (a file kept, or a store arriving): it stays
                pass

    def over_watermark(self, max_used_percent: float, incoming_bytes: int = 0) -> bool:
        """True when storing `incoming_bytes` more would fill the file system beyond the configured share."""
        usage = shutil.disk_usage(self.root)
        return (usage.used + incoming_bytes) * 100.0 / (usage.used + usage.free) > max_used_percent

    def disk_usage(self) -> dict[str, int]:
        usage = shutil.disk_usage(self.root)
        return {"used_bytes": usage.used, "free_bytes": usage.free,
                "used_percent": round(usage.used * 100.0 / (usage.used + usage.free), 1)}


def owner_only_files() -> None:
    """Everything this process (and any process it starts) creates from now on is for its own user only: patient
    data, the database and its journals, keys, temp files. Files the node writes itself also get explicit modes."""
    os.umask(OWNER_ONLY_UMASK)


def sha256_of(chunks: list[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _makedirs_durably(folder: Path, root: Path) -> list[Path]:
    """mkdir -p (owner-only); return the parents whose entries changed, so their new children can be fsynced."""
    missing = []
    probe = folder
    while not probe.exists() and probe != root:
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
    return [path.parent for path in reversed(missing)]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
