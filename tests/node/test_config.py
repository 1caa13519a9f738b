"""Every configuration error path names the key, where it is, and what is wrong."""
from __future__ import annotations

from pathlib import Path

import pytest

from riha_node.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "riha-node.toml"
    path.write_text(text)
    return path


def error_of(path: Path | None, environ: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return str(info.value)


def test_shipped_config_is_valid_and_paths_are_relative_to_it():
    config = load_config(REPO / "riha-node.toml", environ={})
    assert config.node.ae_title == "RIHA" and config.node.port == 11112
    assert config.node.storage_dir == REPO / "riha-data"
    assert config.database_url == f"sqlite:///{REPO / 'riha-data' / 'riha-node.db'}"
    assert [p.ae_title for p in config.peers] == ["PACS", "STORESCU"]
    assert config.pacs[0].port == 4242
    assert config.model.checkpoint is None


def test_defaults_when_no_file_and_none_asked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    assert config.node.port == 11112 and config.peers == []


def test_unknown_key_names_key_and_line(tmp_path):
    path = write(tmp_path, '[node]\nae_title = "RIHA"\nprot = 104\n')
    assert error_of(path) == f"{path}:3: node.prot is not a known key (check the spelling against riha-node.toml's comments)."


def test_unknown_section(tmp_path):
    path = write(tmp_path, '[nodes]\nport = 1\n')
    assert "nodes is not a known key" in error_of(path) and f"{path}:1" in error_of(path)


def test_wrong_type_names_key_line_and_value(tmp_path):
    path = write(tmp_path, '[node]\n\nport = "11112"\n')
    message = error_of(path)
    assert message.startswith(f"{path}:3: node.port is invalid") and "'11112'" in message


def test_port_out_of_range(tmp_path):
    message = error_of(write(tmp_path, '[node]\nport = 70000\n'))
    assert "node.port is invalid" in message and "65535" in message


def test_bad_ae_title(tmp_path):
    message = error_of(write(tmp_path, '[node]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n'))
    assert "node.ae_title is invalid: an AE title is 1 to 16 printable ASCII characters" in message


def test_bad_peer_in_array_names_its_index_and_line(tmp_path):
    path = write(tmp_path, '[[peers]]\nae_title = "A"\n\n[[peers]]\nae_title = "B\\\\C"\n')
    message = error_of(path)
    assert message.startswith(f"{path}:5: peers.1.ae_title is invalid")


def test_peer_without_ae_title(tmp_path):
    assert "peers.0.ae_title is required" in error_of(write(tmp_path, '[[peers]]\nhost = "10.0.0.1"\n'))


def test_invalid_toml(tmp_path):
    message = error_of(write(tmp_path, '[node\nport = 1\n'))
    assert "not valid TOML" in message


def test_explicit_missing_file(tmp_path):
    assert "does not exist; pass --config with the right path" in error_of(tmp_path / "nope.toml")


def test_database_url_scheme(tmp_path):
    message = error_of(write(tmp_path, '[node]\ndatabase_url = "mysql://x"\n'))
    assert "node.database_url is invalid" in message and "postgresql+psycopg://" in message


def test_tls_enabled_without_files(tmp_path):
    message = error_of(write(tmp_path, '[tls]\nenabled = true\n'))
    assert "TLS is enabled but certificate, private_key, ca_certificates is not set" in message


def test_worker_device(tmp_path):
    assert "use auto, cpu, cuda or cuda:N" in error_of(write(tmp_path, '[worker]\ndevice = "gpu0"\n'))


def test_logging_level_choice(tmp_path):
    assert "logging.level is invalid" in error_of(write(tmp_path, '[logging]\nlevel = "loud"\n'))


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, '[node]\nport = 11112\n[study]\nquiet_period_s = 10\n')
    config = load_config(path, environ={"RIHA_NODE_NODE_PORT": "11113", "RIHA_NODE_STUDY_QUIET_PERIOD_S": "2.5",
                                        "RIHA_NODE_NODE_AE_TITLE": "NODE2"})
    assert (config.node.port, config.study.quiet_period_s, config.node.ae_title) == (11113, 2.5, "NODE2")


def test_environment_error_names_the_variable(tmp_path):
    path = write(tmp_path, '[node]\nport = 11112\n')
    message = error_of(path, {"RIHA_NODE_NODE_PORT": "not-a-port"})
    assert message.startswith("environment variable RIHA_NODE_NODE_PORT: node.port is invalid")


def test_environment_unknown_section(tmp_path):
    message = error_of(write(tmp_path, ""), {"RIHA_NODE_NOPE_X": "1"})
    assert "RIHA_NODE_NOPE_X names no configuration key" in message


def test_environment_unknown_key(tmp_path):
    message = error_of(write(tmp_path, ""), {"RIHA_NODE_NODE_PROT": "1"})
    assert "environment variable RIHA_NODE_NODE_PROT: node.prot is not a known key" in message


def test_environment_cannot_set_lists(tmp_path):
    assert "[peers] is a list" in error_of(write(tmp_path, ""), {"RIHA_NODE_PEERS_AE_TITLE": "X"})


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, '[node]\nport = 2000\n')
    assert load_config(None, environ={"RIHA_NODE_CONFIG": str(path)}).node.port == 2000


def test_pacs_as_array_of_tables_and_unknown_destination(tmp_path):
    path = write(tmp_path, '[[pacs]]\nae_title = "A"\nhost = "h"\nport = 1\n[[pacs]]\nae_title = "B"\nhost = "h"\nport = 2\n')
    config = load_config(path, environ={})
    assert config.destination("B").port == 2
    with pytest.raises(ConfigError, match="No destination with AE title 'C' in \\[pacs\\] \\(configured: A, B\\)"):
        config.destination("C")
