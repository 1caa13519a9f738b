"""Site fine-tuning end to end on a running node: phantom studies are pushed, drafted and delivered to PACS, their
signed reports come back as a RIS export, `quality` compares drafts with them, and `retrain` (training in two
processes under torchrun, Gloo on this CPU, the path several GPUs take) produces a judged candidate whose evidence
`models list` shows. Each step goes through the command line as an operator would."""
from __future__ import annotations

import csv
import json

import pydicom
import pytest
from sqlalchemy import func, select

from riha_model.phantoms import write_phantoms
from riha_node.models import ReportQuality
from tests.node.peers import StorescpProcess
from tests.node.test_loop import loop_node, send

pytestmark = [pytest.mark.peer, pytest.mark.slow]

STUDIES = 8
RETRAIN = "[retrain]\nepochs = 2\nbatch_size = 4\nmin_studies = 4\nval_fraction = 0.5\nlr = 1e-3\nprocesses = 2\n"
NODE_KEY = bytes(range(32))  # a fixed node secret: the same patients are held out on every run


def test_drafted_studies_signed_reports_quality_and_a_judged_retrain(tmp_path, phantom_checkpoint):
    annotation = json.loads(write_phantoms(tmp_path / "phantoms", STUDIES, seed=51, dicom=True,
                                           image_size=64).read_text())
    entries = [entry for split in annotation.values() for entry in split]
    receiver = StorescpProcess(tmp_path / "received", aet="PACS").start()
    node = loop_node(tmp_path / "node", phantom_checkpoint, ("PACS", receiver.port), extra=RETRAIN)
    node.storage_dir.mkdir(parents=True)
    (node.storage_dir / "node.key").write_bytes(NODE_KEY)
    node.start()
    signed_reports = {}  # StudyInstanceUID -> the report the phantom was drawn with
    try:
        for entry in entries:
            files = sorted((tmp_path / "phantoms" / "dicom" / entry["id"]).glob("*.dcm"))
            signed_reports[pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID] = entry["report"]
            send(node, *files)
        node.wait_for(lambda: len(node.studies("exported")) == STUDIES, timeout=240, what="every draft delivered")

        export = tmp_path / "ris-export.csv"  # the RIS: study UID and the radiologist's signed findings
        with export.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["study_instance_uid", "report"])
            writer.writerows(signed_reports.items())
            writer.writerow(["1.2.3.999", "A report for a study this node never saw."])
        imported = json.loads(node.cli("import-reports", str(export), "--json").stdout)
        assert (imported["matched"], imported["kept_aside"], imported["rejected"]) == (STUDIES, 1, {})
        database = node.database()
        with database.read() as session:  # scored by the import itself, before anyone asks for `quality`
            assert session.scalar(select(func.count(ReportQuality.id))) == STUDIES
        database.dispose()

        quality = json.loads(node.cli("quality", "--json").stdout)
        [group] = quality["groups"]
        assert group["studies"] == STUDIES and group["model_version"].startswith("riha-tiny-")
        assert 0.0 <= group["bleu_4"] <= 1.0 and 0.0 <= group["ce_agreement"] <= 1.0
        assert quality["kept_aside"] == 1 and quality["studies_without_delivered_draft"] == 0

        outcome = node.cli("retrain", timeout=600)
        assert "promoted" in outcome.stdout or "refused" in outcome.stdout, outcome.stdout
        assert "training under torchrun" in outcome.stderr and "epoch 2/2" in outcome.stderr, outcome.stderr[-2000:]
        versions = {row["version"]: row for row in json.loads(node.cli("models", "list", "--json").stdout)}
        assert len(versions) == 2
        [candidate] = [row for row in versions.values() if row["promoted_by"] != "config"]
        base = versions[group["model_version"]]
        assert candidate["parent"] == base["version"] and candidate["state"] in ("active", "refused")
        counts = candidate["data_counts"]
        assert counts["train"] + counts["val"] == STUDIES and counts["train"] and counts["val"]
        assert "micro_f1" in json.dumps(candidate["metrics"]), "the gate's evidence is kept with the candidate"
        assert (base["state"] == "active") == (candidate["state"] == "refused")
    finally:
        receiver.stop()
        assert node.stop() == 0

