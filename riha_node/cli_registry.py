"""`riha-node models list | activate | rollback` and `riha-node retrain`: the model registry from the command line."""
from __future__ import annotations

import json
from pathlib import Path

import click

from riha_node.cli_common import config_option, load_configured, open_existing_database
from riha_node.config import Config
from riha_node.db import Database
from riha_node.storage import owner_only_files


def _registry(config_path: Path | None) -> tuple[Config, Database]:
    """The configuration and the node's database, with the configured checkpoint registered if it is new."""
    from riha_node.registry import ensure_configured

    config = load_configured(config_path)
    db = open_existing_database(config)
    ensure_configured(db, config)
    return config, db


@click.group()
def models() -> None:
    """The model registry: every checkpoint, which one the workers use, and how it got there."""


@models.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="A JSON list instead of a table.")
def list_models(config_path: Path | None, as_json: bool) -> None:
    """Every model version, newest first: state, parent, data counts, held-out scores, promotion."""
    from riha_node.registry import list_versions

    _, db = _registry(config_path)
    with db.read() as session:
        rows = list_versions(session)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no model versions: set [model] checkpoint in the configuration")
    for row in rows:
        click.echo(f"{row['version']:<32} {row['state']:<9} parent {row['parent'] or '-'}")
        if row["data_counts"]:
            click.echo(f"    data      {', '.join(f'{k} {v}' for k, v in row['data_counts'].items())}")
        held_out = (row["metrics"] or {}).get("held_out")
        if held_out:
            active = row["metrics"].get("active_on_held_out", {})
            click.echo(f"    held out  CE micro F1 {held_out['clinical_efficacy']['micro_f1']:.4f}, BLEU-4 "
                       f"{held_out['BLEU_4']:.4f} (then active {active.get('version', '?')}: "
                       f"{active['clinical_efficacy']['micro_f1']:.4f}, {active['BLEU_4']:.4f})")
        if row["promoted_by"]:
            click.echo(f"    promoted  by {row['promoted_by']} at {row['promoted_at']}")
        if row["reason"]:
            click.echo(f"    reason    {row['reason']}")


@models.command()
@config_option
@click.argument("version")
def activate(config_path: Path | None, version: str) -> None:
    """Make VERSION the workers' model (they switch at their next batch)."""
    from riha_node.registry import activate as make_active

    config, db = _registry(config_path)
    with db.session() as session:
        row = make_active(session, config.node.storage_dir, version, promoted_by="operator",
                          reason="activated by an operator")
        click.echo(f"active model: {row.version}")


@models.command()
@config_option
def rollback(config_path: Path | None) -> None:
    """Make the previously active version active again."""
    from riha_node.registry import rollback as roll_back

    config, db = _registry(config_path)
    with db.session() as session:
        row = roll_back(session, config.node.storage_dir)
        click.echo(f"active model: {row.version} ({row.reason})")


@click.command()
@config_option
def retrain(config_path: Path | None) -> None:
    """Fine-tune the active model on the site's signed reports; promote it only if it is no worse on held-out
    studies."""
    from riha_node.retrain import retrain as run_retrain

    owner_only_files()  # its dataset holds the site's images and reports
    outcome = run_retrain(load_configured(config_path))
    click.echo(f"candidate {outcome.candidate_version} {outcome.reason}; active model: {outcome.active_version}")


COMMANDS = [models, retrain]
