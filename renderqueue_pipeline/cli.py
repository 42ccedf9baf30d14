"""The `renderqueue` command line: database, simulator and webhook commands."""

from __future__ import annotations

import os
import shutil
import sys
import traceback

import click

from renderqueue_pipeline.archive.cli import archive, link
from renderqueue_pipeline.batch.cli import batch, budget, submit
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.reset import db_reset
from renderqueue_pipeline.db.roles import GrantError, check_password, grant_login
from renderqueue_pipeline.db.server import database_url, stop_embedded
from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.ledger.cli import events
from renderqueue_pipeline.ledger.report import print_ledger_status
from renderqueue_pipeline.reconcile.cli import reconcile_command
from renderqueue_pipeline.reconcile.orphans_cli import orphans
from renderqueue_pipeline.redact import install_log_redaction, redact
from renderqueue_pipeline.reports.cli import report
from renderqueue_pipeline.settings import ConfigError
from renderqueue_pipeline.simulator.cli import simulator
from renderqueue_pipeline.spend.cli import spend
from renderqueue_pipeline.webhook.cli import webhook


class _FriendlyGroup(click.Group):
    """Turns our own expected errors into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):

        install_log_redaction()
        try:
            return super().invoke(ctx)
        except (ConfigError, RenderqueueError) as exc:
            click.echo(f"renderqueue: {redact(exc)}", err=True)
            sys.exit(2)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception:  # noqa: BLE001 - a bug: keep the traceback, without any secret in it
            click.echo(redact(traceback.format_exc()), err=True, nl=False)
            sys.exit(1)


@click.group(cls=_FriendlyGroup)
def main() -> None:
    """renderqueue: render queue and spend ledger for fal.ai generation endpoints."""


@main.group()
def db() -> None:
    """The ledger database (embedded Postgres unless DATABASE_URL is set)."""


@db.command("url")
def db_url() -> None:
    """Print the database URL in use (starting the embedded server if needed)."""

    click.echo(database_url())


@db.command("migrate")
def db_migrate() -> None:
    """Apply the migrations in sql/ (safe to run twice and concurrently)."""

    applied = migrate(database_url())
    if applied:
        for version in applied:
            click.echo(f"applied {version}")
    else:
        click.echo("database is up to date")


@db.command("grant")
@click.argument("part", type=click.Choice(["receiver", "pipeline", "analyst"]))
@click.argument("name")
@click.option(
    "--password-env",
    default="RENDERQUEUE_DB_PASSWORD",
    show_default=True,
    help="Environment variable holding the password (unset: asked on the terminal).",
)
def db_grant(part: str, name: str, password_env: str) -> None:
    """Create (or update) LOGIN NAME as a member of the receiver, pipeline or analyst role.

    Run it as the database owner (the DATABASE_URL that migrates). The password comes from
    the environment variable or is asked for; it is never printed or sent in clear text.
    """

    value = os.environ.get(password_env)
    source = password_env
    if value is None:
        if not sys.stdin.isatty():
            raise GrantError(f"{password_env} is not set and there is no terminal to ask on")
        value = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
        source = "the password typed"
    granted = grant_login(database_url(), part, name, check_password(value, source))
    verb = "created" if granted.created else "updated"
    click.echo(
        f"{verb} login {name} in {granted.role} on database {granted.database} (password not shown)"
    )


@db.command("psql", context_settings={"ignore_unknown_options": True})
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def db_psql(psql_args: tuple[str, ...]) -> None:
    """Open psql on the database in use (needs a psql binary on PATH)."""

    psql = shutil.which("psql")
    if psql is None:
        raise click.ClickException("psql is not on PATH; use `renderqueue db url` with your client")
    url = database_url()
    os.execv(psql, [psql, url, *psql_args])  # noqa: S606 - psql found on PATH, replaces us


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded Postgres server of RENDERQUEUE_HOME (if it runs)."""

    click.echo("stopped the embedded server" if stop_embedded() else "no embedded server running")


@db.command("status")
def db_status() -> None:
    """Print the state of the ledger: generations by status and spend by endpoint."""

    print_ledger_status()


@main.command()
@click.option(
    "--headless",
    is_flag=True,
    help="Run the whole flow in this process without the UI, print a summary, and exit 0 "
    "only if the ledger matches the simulator's ground truth.",
)
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster UI.")
def demo(headless: bool, port: int) -> None:
    """The whole product on the embedded defaults: in the Dagster UI, or --headless."""
    if headless:
        # demo loads Dagster: only its command pays for it
        from renderqueue_pipeline.demo import run_headless  # noqa: PLC0415

        if not run_headless():
            sys.exit(1)
        return
    # dev loads Dagster: only its commands pay for it
    from renderqueue_pipeline.dev import run_dev  # noqa: PLC0415

    run_dev(ui_port=port)


@main.command()
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster UI.")
@click.option(
    "--production-shape",
    is_flag=True,
    help="Run the code location as a gRPC code server (port 4000) that the webserver and "
    "daemon reach through a workspace file, and two webhook receivers (8787, 8788).",
)
def dev(port: int, production_shape: bool) -> None:
    """Run the whole product locally and open it in the Dagster UI (Ctrl-C stops it)."""
    # dev loads Dagster: only its commands pay for it
    from renderqueue_pipeline.dev import run_dev  # noqa: PLC0415

    run_dev(ui_port=port, production_shape=production_shape)


db.add_command(db_reset)
main.add_command(events)
main.add_command(simulator)
main.add_command(webhook)
main.add_command(batch)
main.add_command(budget)
main.add_command(submit)
main.add_command(spend)
main.add_command(reconcile_command)
main.add_command(orphans)
main.add_command(archive)
main.add_command(link)
main.add_command(report)

if __name__ == "__main__":  # pragma: no cover
    main()
