"""The files in deploy/ pass the tools that check them and agree with each other and with the production config.

No container engine runs here, so images are not built; what can be checked without one is: the systemd units with
systemd-analyze (verify, and its offline security analysis), the compose file against the configuration it mounts,
and the Dockerfiles' install step being deploy/install.sh, the script CI runs.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from riha_node.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PRODUCTION_CONFIG = DEPLOY / "riha-node.production.toml"
INSTALLED_BINARY = "/opt/riha-node/.venv/bin/riha-node"
CONFIG_PATH = "/etc/riha-node/riha-node.toml"
UNITS = ("riha-node.service", "riha-node-worker@.service")


def systemd_analyze(*args: str, unit_dir: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is not installed (it comes with systemd)"
    return subprocess.run([tool, *args], capture_output=True, text=True, cwd=unit_dir, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "SYSTEMD_UNIT_PATH": f"{unit_dir}:"})


@pytest.fixture
def unit_dir(tmp_path) -> Path:
    """The units as shipped, with ExecStart pointing at a stand-in executable (verify checks that it exists)."""
    binary = tmp_path / "riha-node"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        assert INSTALLED_BINARY in text
        (tmp_path / name).write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return tmp_path


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> every value assigned (systemd allows repeated keys), comments and section headers left out."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_units_pass_systemd_analyze_verify(unit_dir):
    result = systemd_analyze("verify", "riha-node.service", "riha-node-worker@1.service", unit_dir=unit_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"systemd-analyze warns (an unknown key or a bad value): {result.stderr}"


def exposure(unit_dir: Path, unit: str) -> str:
    result = systemd_analyze("security", "--offline=yes", "--threshold=25", unit, unit_dir=unit_dir)
    assert result.returncode == 0, f"{unit} is exposed above 2.5:\n{result.stdout[-3000:]}{result.stderr}"
    assert result.stderr.strip() == "", result.stderr
    return result.stdout


def test_units_hold_no_capability_and_the_port_104_drop_in_adds_only_bind(unit_dir):
    for unit in ("riha-node.service", "riha-node-worker@1.service"):
        report = exposure(unit_dir, unit)
        assert "✓ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)" in report
        assert "✓ AmbientCapabilities=" in report
        assert "✓ ProtectSystem=" in report and "strict read-only" in report
    drop_in = unit_dir / "riha-node.service.d"
    drop_in.mkdir()
    shutil.copy(DEPLOY / "port-104.conf", drop_in)
    assert unit_settings(drop_in / "port-104.conf") == {"CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
                                                        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"]}
    verified = systemd_analyze("verify", "riha-node.service", unit_dir=unit_dir)
    assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stderr
    report = exposure(unit_dir, "riha-node.service")
    assert "✗ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)" in report, "the drop-in took no effect"
    for other in ("CAP_SYS_ADMIN", "CAP_SET(UID|GID|PCAP)", "CAP_SYS_PTRACE", "CAP_(CHOWN|FSETID|SETFCAP)"):
        assert f"✓ CapabilityBoundingSet=~{other}" in report


def test_units_run_the_node_as_its_own_user_on_the_production_config():
    config = load_config(PRODUCTION_CONFIG, environ={})
    assert config.node.port >= 1024, "a privileged port needs deploy/port-104.conf; the example must run without it"
    for name, command in (("riha-node.service", "serve"), ("riha-node-worker@.service", "worker")):
        settings = unit_settings(DEPLOY / name)
        assert settings["ExecStart"] == [f"{INSTALLED_BINARY} {command} --config {CONFIG_PATH}"]
        assert settings["User"] == ["riha-node"] and settings["Group"] == ["riha-node"]
        assert settings["NoNewPrivileges"] == ["yes"] and settings["ProtectSystem"] == ["strict"]
        assert settings["ReadWritePaths"] == [str(config.node.storage_dir)]
        assert settings["StateDirectory"] == [config.node.storage_dir.name]
        assert settings["UMask"] == ["0077"]
        assert settings["CapabilityBoundingSet"] == [""] and settings["AmbientCapabilities"] == [""]
        assert float(settings["TimeoutStopSec"][0]) >= 70, "serve needs 10 s for associations + 60 s for workers"


def test_production_config_loads_and_keeps_metrics_and_secrets_off_the_network():
    config = load_config(PRODUCTION_CONFIG, environ={})
    assert config.source == PRODUCTION_CONFIG.resolve()
    assert config.metrics.host == "127.0.0.1" and config.metrics.port > 0
    url = make_url(config.database_url)
    assert url.drivername == "postgresql+psycopg" and url.password is None, "the password comes from PGPASSWORD"
    assert config.pacs and config.peers and config.model.checkpoint is not None
    assert config.model.checkpoint.is_relative_to(config.node.storage_dir)


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (a named volume, or a path relative to deploy/)."""
    return {target: source for source, target, *_ in (volume.split(":") for volume in service["volumes"])}


def published(service: dict) -> dict[int, tuple[str, int]]:
    """Container port -> (host address, host port)."""
    ports = {}
    for entry in service["ports"]:
        *host, host_port, container_port = entry.split(":")
        ports[int(container_port)] = (host[0] if host else "0.0.0.0", int(host_port))
    return ports


def node_config(service: dict):
    environment = {key: str(value) for key, value in service["environment"].items()}
    config_file = mounts(service)[environment["RIHA_NODE_CONFIG"]]
    assert (DEPLOY / config_file).resolve() == PRODUCTION_CONFIG
    return load_config(PRODUCTION_CONFIG, environ={k: v for k, v in environment.items() if k.startswith("RIHA_NODE_")
                                                  and k != "RIHA_NODE_CONFIG"})


def test_compose_services_ports_and_volumes_agree_with_the_production_config():
    services = compose()["services"]
    assert set(services) == {"postgres", "pacs", "node", "worker"}
    node, worker, postgres = services["node"], services["worker"], services["postgres"]
    config = node_config(node)

    assert node["command"] == ["serve"] and worker["command"] == ["worker"]
    assert worker["deploy"]["replicas"] >= 1 and "ports" not in worker
    assert mounts(node) == mounts(worker), "workers need the same configuration and storage as serve"
    assert node_config(worker).database_url == config.database_url
    storage_volume = mounts(node)[str(config.node.storage_dir)]
    assert storage_volume in compose()["volumes"], "storage must be a named volume shared by node and workers"

    ports = published(node)
    assert ports[config.node.port] == ("0.0.0.0", config.node.port) and config.node.host == "0.0.0.0"
    assert ports[config.metrics.port] == ("127.0.0.1", config.metrics.port), "metrics stay on the host's loopback"
    assert config.metrics.host == "0.0.0.0", "inside the container, so that the published port reaches it"
    assert f"http://127.0.0.1:{config.metrics.port}/healthz" in " ".join(node["healthcheck"]["test"])

    url = make_url(config.database_url)
    assert url.host in services and services[url.host] is postgres
    assert (url.username, url.database) == (postgres["environment"]["POSTGRES_USER"],
                                            postgres["environment"]["POSTGRES_DB"])
    assert node["environment"]["PGPASSWORD"] == postgres["environment"]["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{RIHA_DB_PASSWORD:\?[^}]+\}", postgres["environment"]["POSTGRES_PASSWORD"]), \
        "no default password: compose must refuse to start without one"
    assert node["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_test_pacs_and_the_node_point_at_each_other():
    services = compose()["services"]
    config = node_config(services["node"])
    pacs_service = services["pacs"]
    orthanc = json.loads((DEPLOY / mounts(pacs_service)["/etc/orthanc/orthanc.json"]).read_text())
    [destination] = config.pacs
    assert destination.host in services and services[destination.host] is pacs_service
    assert (destination.ae_title, destination.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    assert any(peer.ae_title == orthanc["DicomAet"] and peer.host == destination.host for peer in config.peers)
    assert [config.node.ae_title, "node", config.node.port] in orthanc["DicomModalities"].values()
    assert published(pacs_service)[orthanc["HttpPort"]][0] == "127.0.0.1"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_install_with_the_script_ci_runs(name):
    instructions = dockerfile_instructions(DEPLOY / name)
    runs = [args for kind, args in instructions if kind == "RUN"]
    assert sum("bash deploy/install.sh" in run for run in runs) == 1
    assert not any(re.search(r"\bpip3?\b", run) for run in runs), "Python packages come from deploy/install.sh only"
    copies = [args.split() for kind, args in instructions if kind == "COPY"]
    for *sources, _target in copies:
        for source in sources:
            assert (REPO / source).exists(), f"{name} copies {source}, which is not in the repository"
    assert ["deploy/riha-node.production.toml", CONFIG_PATH] in copies
    assert ("WORKDIR", str(Path(INSTALLED_BINARY).parents[2])) in instructions, "the units' ExecStart path"
    assert ("ENTRYPOINT", json.dumps([INSTALLED_BINARY])) in instructions
    assert ("USER", "riha-node") in instructions
    env = " ".join(args for kind, args in instructions if kind == "ENV")
    assert f"RIHA_NODE_CONFIG={CONFIG_PATH}" in env


def test_install_script_is_what_ci_runs_and_parses():
    assert "bash deploy/install.sh --test" in (REPO / ".ci" / "run").read_text()
    checked = subprocess.run(["bash", "-n", str(DEPLOY / "install.sh")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
