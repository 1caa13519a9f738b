"""What every operator command shares: the --config option, loading the configuration (with logging set up from it),
and opening the database a node already created, at the schema this release expects."""
from __future__ import annotations

from pathlib import Path

import click

from riha_node.config import Config, ConfigError, load_config
from riha_node.db import Database, sqlite_path
from riha_node.log import configure_logging

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             default=None, help="Configuration file (default: ./riha-node.toml or $RIHA_NODE_CONFIG).")


def load_configured(config_path: Path | None) -> Config:
    config = load_config(config_path)
    configure_logging(config.logging.level, config.logging.format)
    return config


def open_existing_database(config: Config) -> Database:
    """The node's database as `serve` left it; one clear error when there is none yet or its schema is older."""
    path = sqlite_path(config.database_url)
    if path is not None and not path.exists():
        raise ConfigError(f"No database at {path}: start `riha-node serve` or run `riha-node db upgrade` first.")
    database = Database(config.database_url)
    database.require_current()
    return database
