"""The `riha-node` command line: one group, one command per operator task.

Errors an operator can cause end as one sentence on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import click
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from riha_model.errors import RihaModelError
from riha_node import cli_data, cli_model, cli_registry, cli_reports
from riha_node.cli_common import config_option, load_configured, open_existing_database
from riha_node.config import Config, DestinationConfig
from riha_node.db import Database
from riha_node.errors import UserError
from riha_node.log import configure_logging
from riha_node.reporting import list_studies, node_status
from riha_node.states import StudyState
from riha_node.storage import InstanceStore, owner_only_files
from riha_node.tls import client_context

EXIT_USER_ERROR = 2


class RihaGroup(click.Group):
    """Turns the errors an operator can cause into one line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, RihaModelError) as exc:
            click.echo(f"riha-node: {exc}", err=True)
            ctx.exit(EXIT_USER_ERROR)


@click.group(cls=RihaGroup)
@click.version_option(package_name="riha-node")
def main() -> None:
    """riha-node: drafts chest X-ray reports beside PACS and returns them as DICOM Structured Reports."""


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the DICOM listener and the study scheduler until SIGTERM or Ctrl-C."""
    from riha_node.serve import serve as run_node

    owner_only_files()
    run_node(load_configured(config_path))


@main.command()
@config_option
def worker(config_path: Path | None) -> None:
    """Run one extra worker (same database and storage) until SIGTERM or Ctrl-C."""
    from riha_node.worker import run_worker

    owner_only_files()
    run_worker(load_configured(config_path))


@main.command()
@config_option
@click.argument("study_uid")
def retry(config_path: Path | None, study_uid: str) -> None:
    """Queue a failed study again, or send an export_failed study's draft again."""
    from riha_node.interventions import retry_study

    config = load_configured(config_path)
    with open_existing_database(config).session() as session:
        click.echo(retry_study(session, study_uid))


@main.command()
@config_option
@click.argument("study_uid")
def discard(config_path: Path | None, study_uid: str) -> None:
    """Take a study out of the node's work: mark it ignored, cancel its job, send no undelivered draft."""
    from riha_node.interventions import discard_study

    config = load_configured(config_path)
    with open_existing_database(config).session() as session:
        click.echo(discard_study(session, study_uid))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Studies by state, queue, stage times, exports, workers, model, disk, and the running node's traffic."""
    from riha_node.health import live_traffic

    config = load_configured(config_path)
    with open_existing_database(config).read() as session:
        summary = node_status(session, config, InstanceStore(config.node.storage_dir))
    summary["traffic"] = live_traffic(config)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"node      {summary['node']['ae_title']} on {summary['node']['host']}:{summary['node']['port']}")
    by_state = ", ".join(f"{state} {count}" for state, count in summary["studies"].items() if count)
    click.echo(f"studies   {by_state or 'none'}")
    click.echo(f"instances {summary['instances']} ({summary['stored_bytes'] / 1e6:.1f} MB)")
    click.echo("queue     " + ", ".join(f"{state} {count}" for state, count in summary["queue"].items()))
    for stage, times in summary["stages"].items():
        mean = f"mean {times['sum_s'] / times['count']:.1f} s" if times["count"] else "none yet"
        click.echo(f"stage     {stage.replace('_', ' ')}: {times['count']} studies, {mean}")
    exports = summary["exports"]
    click.echo("exports   " + (", ".join(f"{state} {count}" for state, count in exports["by_state"].items())
                               or "none") + f"; {exports['attempts']} attempts, {exports['failed_attempts']} failed")
    workers = summary["workers"]
    holding = ", ".join(f"{lease['worker']} ({lease['jobs']} jobs)" for lease in workers["holding_leases"])
    click.echo(f"workers   {len(workers['holding_leases'])} holding leases{': ' + holding if holding else ''}; "
               f"{workers['stale_leases']} stale leases")
    model = summary["model"]
    click.echo(f"model     {model['checkpoint'] or 'none configured'}; active version "
               f"{model['active_version'] or '-'}; last draft by {model['last_report_version'] or '-'}")
    disk = summary["disk"]
    click.echo(f"disk      {disk['used_percent']:.0f}% used "
               f"(watermark {disk['watermark_percent']:g}%)")
    traffic = summary["traffic"]
    if traffic is None:
        click.echo("traffic   node not running, or [metrics] port is 0")
    else:
        rejected = sum(traffic["associations_rejected"].values())
        click.echo(f"traffic   {sum(traffic['instances_received'].values())} C-STOREs "
                   f"({traffic['received_bytes'] / 1e6:.1f} MB), associations {traffic['associations_accepted']} "
                   f"accepted, {rejected} rejected (since the node started)")


@main.command()
@config_option
@click.option("--state", type=click.Choice([s.value for s in StudyState]), default=None, help="Only this state.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list instead of a table.")
def studies(config_path: Path | None, state: str | None, as_json: bool) -> None:
    """List studies with their state and the reason for it."""
    config = load_configured(config_path)
    with open_existing_database(config).read() as session:
        rows = list_studies(session, StudyState(state) if state else None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        reason = f"  ({row['reason']})" if row["reason"] else ""
        click.echo(f"{row['id']:>6}  {row['state']:<13} {row['instances']:>3} inst  {row['study_uid']}{reason}")
    if not rows:
        click.echo("no studies")


PEER_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@main.command()
@config_option
@click.argument("peer")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the peer.")
def echo(config_path: Path | None, peer: str, timeout: float) -> None:
    """C-ECHO PEER: an AE title from [pacs], or AE@HOST:PORT."""
    config = load_configured(config_path)
    destination = _destination(config, peer)
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    tls_args = (client_context(config.tls), None) if destination.tls else None
    started = time.monotonic()
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    where = f"{destination.ae_title} at {destination.host}:{destination.port}"
    if assoc.is_rejected:
        rsd = assoc.acceptor.primitive
        raise UserError(f"{where} rejected the association (result {rsd.result}, source {rsd.result_source}, "
                        f"reason {rsd.diagnostic}); check that it knows AE title {config.node.ae_title!r}.")
    if not assoc.is_established:
        raise UserError(f"Cannot associate with {where}: no answer or connection refused; check host, port and "
                        "that the peer is running.")
    try:
        answer = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(answer, "Status", None)
    if code != 0x0000:
        raise UserError(f"{where} answered the C-ECHO with status {code!r}.")
    click.echo(f"C-ECHO {where}: success in {(time.monotonic() - started) * 1000:.0f} ms")


def _destination(config: Config, peer: str) -> DestinationConfig:
    if match := PEER_ADDRESS.match(peer):
        return DestinationConfig(ae_title=match["ae"], host=match["host"], port=int(match["port"]))
    return config.destination(peer)


@main.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("riha-demo"),
              show_default=True, help="Where the demo keeps its model, phantoms, node storage and received drafts.")
@click.option("--studies", type=click.IntRange(1, 50), default=6, show_default=True, help="Phantom studies to push.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(workdir: Path, studies: int, seed: int) -> None:
    """The whole loop on this machine: phantom studies in over DICOM, draft SRs back to a local receiver."""
    from riha_node.demo import run_demo

    configure_logging("warning", "console")
    run_demo(workdir.resolve(), studies, seed)


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command()
@config_option
def upgrade(config_path: Path | None) -> None:
    """Apply every pending schema migration (serve also does this at start)."""
    config = load_configured(config_path)
    database = Database(config.database_url)
    database.upgrade()
    click.echo(f"database at {database.safe_url} is up to date")


@db.command("migrate-to")
@config_option
@click.argument("url")
def migrate_to(config_path: Path | None, url: str) -> None:
    """Move this node's SQLite database to the empty PostgreSQL database URL (node and workers stopped)."""
    from riha_node.db_tools import migrate_to as copy_database

    config = load_configured(config_path)
    copied = copy_database(config.database_url, url)
    for table, rows in copied.rows_by_table.items():
        click.echo(f"{table:<20} {rows:>8} rows copied, counts match")
    where = config.source or "riha-node.toml"
    click.echo(f"\nNow set in {where}, under [node]:\n    database_url = \"{copied.target_url}\"\n"
               "(with the password of the URL you gave; or export RIHA_NODE_NODE_DATABASE_URL), keep storage_dir as it "
               "is, and start riha-node serve. The SQLite file was left as it was.")


@db.command()
@config_option
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def backup(config_path: Path | None, path: Path) -> None:
    """Consistent online backup of the SQLite database to PATH (safe while serve runs)."""
    from riha_node.db_tools import backup as back_up

    config = load_configured(config_path)
    made = back_up(config.database_url, path)
    click.echo(f"backup of {made.studies} studies written to {made.path} ({made.size_bytes / 1e6:.1f} MB); "
               "to restore, stop the node and copy it over the database file")


for command in (*cli_model.COMMANDS, *cli_data.COMMANDS, *cli_reports.COMMANDS, *cli_registry.COMMANDS):
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
