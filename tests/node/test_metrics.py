"""A running `riha-node serve` answers /metrics, /healthz and /readyz, and `status --json` shows the same figures."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save_file

from riha_node.config import load_config
from riha_node.health import model_check
from tests.node.peers import LOOPBACK_HTTP, VENV_BIN, NodeProcess, StorescpProcess, dcmtk, dcmtk_env, free_port
from tests.node.postgres import PostgresServer
from tests.node.samples import dataset_bytes, derive, real_file


def metrics_node(workdir, extra_toml: str = "", workers: int = 0) -> NodeProcess:
    port = free_port()
    node = NodeProcess(workdir, extra_toml=f"[metrics]\nport = {port}\n\n[worker]\nprocesses = {workers}\n"
                       "device = \"cpu\"\n" + extra_toml)
    node.metrics_port = port
    return node.start()


def get(node: NodeProcess, path: str) -> tuple[int, str]:
    try:
        with LOOPBACK_HTTP.open(f"http://127.0.0.1:{node.metrics_port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(node: NodeProcess) -> dict[tuple[str, tuple], float]:
    status, text = get(node, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.peer
@pytest.mark.slow
def test_counters_move_with_a_push_and_a_rejection_and_status_agrees(tmp_path):
    node = metrics_node(tmp_path / "node")
    try:
        assert get(node, "/healthz") == (200, json.dumps({"alive": True}))
        before = samples(node)
        assert before[("riha_node_database_up", ())] == 1
        assert before.get(("riha_node_instances_received_total", (("status", "0x0000"),)), 0) == 0
        chest = derive(real_file("RG1_UNCR.dcm"), tmp_path / "chest.dcm")
        pushed = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "RIHA", "127.0.0.1", str(node.port),
                                 str(chest)], capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        assert pushed.returncode == 0, pushed.stderr
        intruder = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "RIHA", "127.0.0.1",
                                   str(node.port)], capture_output=True, text=True, env=dcmtk_env(), timeout=30)
        assert intruder.returncode != 0
        node.wait_for(lambda: node.status()["studies"]["queued"] == 1, timeout=20, what="the study to be queued")

        after = samples(node)
        [stored] = (node.storage_dir / "studies").rglob("*.dcm")
        received_bytes = len(dataset_bytes(stored))  # the data set as it travelled (storescu may re-encode it)
        assert after[("riha_node_instances_received_total", (("status", "0x0000"),))] == 1
        assert after[("riha_node_received_bytes_total", ())] == received_bytes
        assert after[("riha_node_associations_accepted_total", ())] >= 1
        assert after[("riha_node_associations_rejected_total", (("reason", "calling_ae_not_recognised"),))] == 1
        assert after[("riha_node_instances_stored", ())] == 1
        assert after[("riha_node_studies", (("state", "queued"),))] == 1
        assert after[("riha_node_jobs", (("state", "queued"),))] == 1
        stage = (("stage", "receive_to_queued"),)
        assert after[("riha_node_stage_seconds_count", stage)] == 1
        quiet = node.quiet_period_s
        assert quiet <= after[("riha_node_stage_seconds_sum", stage)] < quiet + 10

        status = node.status()
        assert status["instances"] == after[("riha_node_instances_stored", ())]
        assert status["stored_bytes"] == after[("riha_node_stored_bytes", ())]
        for state, count in status["studies"].items():
            assert after[("riha_node_studies", (("state", state),))] == count
        for state, count in status["queue"].items():
            assert after[("riha_node_jobs", (("state", state),))] == count
        for name, times in status["stages"].items():
            assert after[("riha_node_stage_seconds_count", (("stage", name),))] == times["count"]
        assert status["traffic"] == {"instances_received": {"0x0000": 1}, "received_bytes": received_bytes,
                                     "associations_accepted": after[("riha_node_associations_accepted_total", ())],
                                     "associations_rejected": {"calling_ae_not_recognised": 1}}
        assert status["workers"] == {"holding_leases": [], "stale_leases": 0}

        code, body = get(node, "/readyz")
        assert code == 503
        checks = json.loads(body)["checks"]
        assert checks["database"] == {"ok": True} and checks["disk"] == {"ok": True}
        assert checks["model"]["ok"] is False and "[model] checkpoint" in checks["model"]["problem"]

        second = NodeProcess(tmp_path / "second",
                             extra_toml=f"[metrics]\nport = {node.metrics_port}\n\n[worker]\nprocesses = 0\n")
        second.workdir.mkdir()
        second.write_config()
        served = subprocess.run([str(VENV_BIN / "riha-node"), "serve", "--config", str(second.config_path)],
                                capture_output=True, text=True, timeout=60)
        assert served.returncode == 2, "a metrics port in use is an operator's error, stated in one line"
        assert f"Cannot serve metrics on 127.0.0.1:{node.metrics_port}" in served.stderr
        assert "Traceback" not in served.stderr
    finally:
        assert node.stop() == 0


@pytest.mark.peer
@pytest.mark.slow
def test_a_drafted_and_delivered_study_shows_in_every_stage_and_readyz_follows_model_and_database(
        tmp_path, phantom_checkpoint):
    pacs = StorescpProcess(tmp_path / "pacs").start()
    node = metrics_node(tmp_path / "node", workers=1, extra_toml=(
        f'\n[model]\ncheckpoint = "{phantom_checkpoint}"\n\n'
        f'[pacs]\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'))
    database = node.storage_dir / "riha-node.db"
    try:
        code, body = get(node, "/readyz")
        assert code == 200, body
        assert json.loads(body) == {"ready": True, "checks": {"database": {"ok": True}, "disk": {"ok": True},
                                                              "model": {"ok": True}}}
        chest = derive(real_file("RG1_UNCR.dcm"), tmp_path / "chest.dcm")
        pushed = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "RIHA", "127.0.0.1", str(node.port),
                                 str(chest)], capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        assert pushed.returncode == 0, pushed.stderr
        node.wait_for(lambda: node.status()["studies"]["exported"] == 1, timeout=60, what="the draft to be delivered")
        figures, status = samples(node), node.status()
        for stage, times in status["stages"].items():
            assert times["count"] == 1, stage
            assert figures[("riha_node_stage_seconds_count", (("stage", stage),))] == 1
            assert figures[("riha_node_stage_seconds_sum", (("stage", stage),))] == pytest.approx(times["sum_s"])
        assert status["exports"] == {"by_state": {"delivered": 1}, "attempts": 1, "failed_attempts": 0}
        assert figures[("riha_node_exports", (("state", "delivered"),))] == 1
        assert figures[("riha_node_export_failed_attempts", ())] == 0
        version = status["model"]["last_report_version"]
        assert version and version.startswith("riha-")
        assert figures[("riha_node_model_info", (("active_version", status["model"]["active_version"] or ""),
                                                 ("checkpoint", str(phantom_checkpoint)),
                                                 ("last_report_version", version)))] == 1
        assert figures[("riha_node_worker_processes", ())] == 1
        assert len(pacs.received()) == 1

        moved = database.with_suffix(".moved")
        shutil.move(database, moved)
        try:
            code, body = get(node, "/readyz")
            assert code == 503
            assert json.loads(body)["checks"]["database"]["ok"] is False
            assert not database.exists(), "the readiness probe must not create an empty database"
        finally:
            shutil.move(moved, database)
        deadline = time.monotonic() + 10
        while get(node, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "readiness must come back with the database"
            time.sleep(0.2)
    finally:
        assert node.stop() == 0
        pacs.stop()


@pytest.mark.peer
@pytest.mark.slow
def test_on_postgresql_the_figures_agree_and_readyz_fails_while_the_server_is_down(tmp_path):
    server = PostgresServer().start()
    try:
        url = server.create_database("riha")
        node = metrics_node(tmp_path / "node", extra_toml="")
        node.stop()
        config = node.config_path.read_text()
        node.config_path.write_text(config.replace('database_url = ""', f'database_url = "{url}"'))
        node.start()
        try:
            chest = derive(real_file("RG1_UNCR.dcm"), tmp_path / "chest.dcm")
            pushed = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "RIHA", "127.0.0.1",
                                     str(node.port), str(chest)], capture_output=True, text=True, env=dcmtk_env(),
                                    timeout=60)
            assert pushed.returncode == 0, pushed.stderr
            node.wait_for(lambda: node.status()["studies"]["queued"] == 1, timeout=20, what="the study to be queued")
            figures, status = samples(node), node.status()
            assert figures[("riha_node_database_up", ())] == 1
            assert figures[("riha_node_stage_seconds_count", (("stage", "receive_to_queued"),))] == 1
            assert status["stages"]["receive_to_queued"]["count"] == 1
            assert status["stages"]["receive_to_queued"]["buckets"]["3600"] == 1
            assert figures[("riha_node_studies", (("state", "queued"),))] == status["studies"]["queued"] == 1
            assert json.loads(get(node, "/readyz")[1])["checks"]["database"] == {"ok": True}

            server.halt()
            code, body = get(node, "/readyz")
            assert code == 503 and json.loads(body)["checks"]["database"]["ok"] is False
            assert samples(node)[("riha_node_database_up", ())] == 0, "/metrics still answers, saying so"
            server.resume()
            assert json.loads(get(node, "/readyz")[1])["checks"]["database"] == {"ok": True}
        finally:
            assert node.stop() == 0
    finally:
        server.stop()


def test_readiness_names_a_model_file_that_is_not_a_riha_checkpoint(tmp_path):
    junk, foreign = tmp_path / "junk.riha", tmp_path / "foreign.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    save_file({"weight": np.zeros(3, dtype=np.float32)}, str(foreign), metadata={"format": "pt"})
    for path, problem in ((junk, "cannot be read"), (foreign, "is not a RIHA checkpoint"),
                          (tmp_path / "absent.riha", "cannot be read")):
        (tmp_path / "riha-node.toml").write_text(f'[model]\ncheckpoint = "{path.name}"\n')
        config = load_config(tmp_path / "riha-node.toml", environ={})
        assert problem in model_check(config)
