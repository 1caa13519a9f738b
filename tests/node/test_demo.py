"""`riha-node demo`, the README's first command, with its phantom model already trained (the demo reuses one it
finds): a real node drafts every pushed phantom study, the stand-in PACS receives each SR, the node stops cleanly."""
from __future__ import annotations

import shutil
import subprocess

import pydicom
import pytest

from tests.node.peers import VENV_BIN

pytestmark = pytest.mark.slow

STUDIES = 2


def test_demo_drafts_every_pushed_study_and_prints_a_row_for_each(tmp_path, phantom_checkpoint):
    workdir = tmp_path / "riha-demo"
    (workdir / "model").mkdir(parents=True)
    shutil.copy(phantom_checkpoint, workdir / "model" / "phantom-tiny.ckpt")
    result = subprocess.run([str(VENV_BIN / "riha-node"), "demo", "--dir", str(workdir), "--studies", str(STUDIES)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Reusing the phantom model" in result.stdout
    assert "no draft within the time limit" not in result.stdout, result.stdout
    header = next(i for i, line in enumerate(result.stdout.splitlines()) if line.startswith("study "))
    rows = result.stdout.splitlines()[header + 1:header + 1 + STUDIES]
    assert all(row.startswith("phantom") for row in rows), result.stdout
    received = sorted((workdir / "received").glob("*.dcm"))
    assert len(received) == STUDIES
    assert {pydicom.dcmread(path).Modality for path in received} == {"SR"}
    log = (workdir / "node.log").read_text()
    assert '"event": "node stopped"' in log and "Traceback" not in log
