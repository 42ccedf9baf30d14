"""Secrets: a key with surrounding whitespace works and leaks nowhere; a key with a control
character inside is refused naming the variable; every exit redacts configured secrets.

The canary run: real CLI commands and a real Dagster run (Postgres storage) against the
simulator with a canary FAL_KEY / FAL_ADMIN_KEY carrying a mounted secret's newline,
through the happy path, fal's 401 and fal's 500; then stdout/stderr, every log record,
the log files, every row of every ledger table and every row of Dagster's storage are
searched for the canary: zero hits.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from batch_helpers import SEEDANCE, dagster_instance, prompts, submit_file, write_csv
from click.testing import CliRunner
from rich.console import Console
from spend_helpers import ADMIN_KEY
from test_production_shape import LAUNCH, _free_ports, _graphql, _wait_for_location
from webhook_helpers import serving

from renderqueue_pipeline.batch import BatchOptions
from renderqueue_pipeline.cli import main
from renderqueue_pipeline.dagster_home import dagster_storage_url
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.defs.batch.jobs import submit_batch
from renderqueue_pipeline.defs.batch.resources import PromptsInbox
from renderqueue_pipeline.defs.resources import LedgerDatabase, fal_connection
from renderqueue_pipeline.dev import running_stack, wait_for_run
from renderqueue_pipeline.fal_gateway import FalSubmitOutcomeUnknown
from renderqueue_pipeline.redact import RedactingFilter, redact
from renderqueue_pipeline.settings import get_settings
from renderqueue_pipeline.simulator.testing import RunningSimulator
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app

CANARY_ID = "canaryid-5e0f1d2c"
CANARY_SECRET = "canarysecret-a41b7c9e3d2f"
CANARY_KEY = f"{CANARY_ID}:{CANARY_SECRET}"
ADMIN_CANARY = "admincanary-9c8b7a6f5e4d"
DB_PASSWORD = "dbcanary-77f1e2d3"


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def canary_env(ledger_env: str, settings_env: Callable[..., None]) -> None:
    """FAL_KEY and FAL_ADMIN_KEY as a mounted secret file gives them: a trailing newline."""
    settings_env(FAL_KEY=CANARY_KEY + "\n", FAL_ADMIN_KEY=" " + ADMIN_CANARY + "\r\n")


def test_surrounding_whitespace_is_stripped_from_every_setting(
    settings_env: Callable[..., None],
) -> None:
    settings_env(
        FAL_KEY=CANARY_KEY + "\n",
        FAL_ADMIN_KEY="\t" + ADMIN_CANARY + " ",
        RENDERQUEUE_PROMPTS_URL=" s3://bucket/inbox\n",
    )
    settings = get_settings()
    assert settings.fal_key.get_secret_value() == CANARY_KEY
    assert settings.fal_admin_key.get_secret_value() == ADMIN_CANARY
    assert settings.prompts == "s3://bucket/inbox"


@pytest.mark.parametrize("variable", ["FAL_KEY", "FAL_ADMIN_KEY", "DATABASE_URL"])
def test_a_control_character_inside_a_secret_is_refused_naming_the_variable_not_the_value(
    ledger_env: str, settings_env: Callable[..., None], variable: str
) -> None:
    value = {
        "FAL_KEY": f"{CANARY_ID}\n:{CANARY_SECRET}",
        "FAL_ADMIN_KEY": f"{ADMIN_CANARY}\x1b[0mx",
        "DATABASE_URL": f"postgresql://u:{DB_PASSWORD}@127.0.0.1/x\tq",
    }[variable]
    settings_env(**{variable: value})
    code, out, err = cli("submit", "--user-id", "1", "--endpoint", SEEDANCE, "--prompt", "p")
    assert code == 2
    assert err.startswith(f"renderqueue: {variable}: contains a control character")
    for secret in (CANARY_ID, CANARY_SECRET, ADMIN_CANARY, DB_PASSWORD):
        assert secret not in out + err


def test_redact_removes_every_configured_secret_and_its_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    monkeypatch.setenv("FAL_KEY", CANARY_KEY + "\n")
    monkeypatch.setenv("FAL_ADMIN_KEY", ADMIN_CANARY)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://rq:{DB_PASSWORD}@127.0.0.1:5432/rq")
    text = (
        f"Illegal header value b'Key {CANARY_KEY} ' / secret alone {CANARY_SECRET} / "
        f"admin {ADMIN_CANARY} / url postgresql://rq:{DB_PASSWORD}@127.0.0.1/rq"
    )
    clean = redact(text)
    for secret in (CANARY_ID, CANARY_SECRET, ADMIN_CANARY, DB_PASSWORD):
        assert secret not in clean
    assert clean.startswith("Illegal header value b'Key *** '")
    record = logging.LogRecord("renderqueue.fal", logging.ERROR, __file__, 1, "%s", (text,), None)
    RedactingFilter().filter(record)
    assert CANARY_SECRET not in record.getMessage()


class _KeyEchoingGateway:
    """A fault no simulator gives: fal's error text quoting our key back to us."""

    def __init__(self, concurrency: int) -> None:
        pass

    async def __aenter__(self) -> _KeyEchoingGateway:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def submit(self, endpoint: str, inputs: dict[str, Any]) -> Any:

        raise FalSubmitOutcomeUnknown(
            f"Illegal header value b'Key {CANARY_KEY}'", endpoint=endpoint
        )


def _hits_in_database(url: str, needles: tuple[str, ...]) -> list[str]:
    """`table: needle` for every table of every schema with a row whose text holds it."""
    hits = []
    with connect(url) as conn:
        tables = conn.execute(
            "select format('%I.%I', table_schema, table_name) as name "
            "from information_schema.tables where table_type = 'BASE TABLE' "
            "and table_schema not in ('pg_catalog', 'information_schema')"
        ).fetchall()
        for table in tables:
            for needle in needles:
                row = conn.execute(
                    # the name comes from the catalog, quoted by format('%I.%I')
                    f"select count(*) as n from {table['name']} as t where strpos(t::text, %s) > 0",  # noqa: S608
                    (needle,),
                ).fetchone()
                if row["n"]:
                    hits.append(f"{table['name']}: {needle}")
    return hits


def test_a_canary_key_appears_in_no_output_log_ledger_row_or_dagster_storage(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    canary_env: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    dagster_storage: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fal_sim.control.set_faults(fal_key=CANARY_KEY, admin_key=ADMIN_CANARY)  # the canary account
    printed: list[str] = []
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    # the happy path: a single submit and a batch from the CLI, a batch through Dagster
    code, out, err = cli("submit", "--user-id", "3", "--endpoint", SEEDANCE, "--prompt", "owl")
    printed += [out, err]
    assert code == 0, err
    path = write_csv(tmp_path / "a.csv", prompts(3, tag="cli"))
    code, out, err = cli("batch", "submit", str(path), "--endpoint", SEEDANCE)
    printed += [out, err]
    assert code == 0, err
    assert "submitted   3" in out

    with dagster_instance(dagster_storage) as instance:

        def run(name: str) -> dg.ExecuteInProcessResult:
            file = write_csv(inbox / name, prompts(2, tag=name))
            return submit_batch.execute_in_process(
                run_config={
                    "ops": {
                        "submit_prompts_file": {
                            "config": {"file_url": file.as_uri(), "default_endpoint": SEEDANCE}
                        }
                    }
                },
                instance=instance,
                resources={
                    "ledger": LedgerDatabase(url=ledger_url),
                    "prompts_inbox": PromptsInbox(url=inbox.as_uri()),
                    "fal": fal_connection(),
                },
                raise_on_error=False,
            )

        assert run("dagster-ok.csv").success
        # fal's 401: the CLI and Dagster both stop, naming FAL_KEY
        fal_sim.control.set_faults(fal_key="not-the-canary-key")
        code, out, err = cli("submit", "--user-id", "3", "--endpoint", SEEDANCE, "--prompt", "x")
        printed += [out, err]
        assert code == 2
        path = write_csv(tmp_path / "b.csv", prompts(2, tag="unauthorized"))
        code, out, err = cli("batch", "submit", str(path), "--endpoint", SEEDANCE)
        printed += [out, err]
        assert code == 2
        assert "FAL_KEY" in err
        assert not run("dagster-401.csv").success
        # fal's 500 after accepting: the items' outcome is unknown, with the error stored
        fal_sim.control.set_faults(fal_key=CANARY_KEY, api_500_rate=1.0)
        path = write_csv(tmp_path / "c.csv", prompts(2, tag="five-hundred"))
        code, out, err = cli("batch", "submit", str(path), "--endpoint", SEEDANCE)
        printed += [out, err]
        assert "unknown" in out
        run("dagster-500.csv")
        fal_sim.control.set_faults(api_500_rate=0.0)
        # an error text that quotes the key (no real fal does; a proxy might)
        echo = write_csv(tmp_path / "d.csv", prompts(2, tag="echo"))
        submit_file(
            echo.as_uri(),
            BatchOptions(default_endpoint=SEEDANCE),
            ledger_url=ledger_url,
            log=printed.append,
            gateway_factory=_KeyEchoingGateway,
        )
        storage = dagster_storage.replace("postgresql+psycopg2", "postgresql")
        dagster_hits = _hits_in_database(storage, (CANARY_SECRET, ADMIN_CANARY))

    reasons = conn.execute(
        "select reason from batch_items where reason like 'outcome unknown%%'"
    ).fetchall()
    assert reasons
    assert all("Key ***" in r["reason"] for r in reasons if "Illegal" in r["reason"])
    needles = (CANARY_ID, CANARY_SECRET, ADMIN_CANARY)
    text = "\n".join(printed) + "\n".join(r.getMessage() for r in caplog.records)
    text += caplog.text
    logs = Path(get_settings().home_dir)
    for file in logs.rglob("*.log") if logs.exists() else []:
        text += file.read_text(errors="replace")
    assert [n for n in needles if n in text] == []
    assert _hits_in_database(ledger_url, needles) == []
    assert dagster_hits == []


def test_an_admin_key_with_a_trailing_newline_works_for_spend_prices_and_is_never_printed(
    ledger_env: str,
    fal_billing: Any,
    settings_env: Callable[..., None],
) -> None:
    settings_env(FAL_ADMIN_KEY=ADMIN_KEY + "\n", RENDERQUEUE_FAL_API_URL=fal_billing.api_url)
    code, out, err = cli("spend", "prices")
    assert code == 0, err
    assert "checked" in out
    assert ADMIN_KEY not in out + err


@pytest.mark.timeout(400)
@pytest.mark.e2e
def test_the_headless_demo_with_a_canary_key_leaves_it_nowhere(
    fal_sim: RunningSimulator,
    fal_billing: Any,
    ledger_url: str,
    conn: psycopg.Connection,
    tmp_path: Path,
) -> None:
    """`renderqueue demo --headless` with FAL_KEY set (fal = the simulator, receiver here):
    submit, webhooks, reconcile, archive, reports and billing, keys with a newline."""

    home = tmp_path / "home"
    fal_sim.control.set_faults(fal_key=CANARY_KEY, admin_key=ADMIN_KEY)  # the canary account
    with serving(create_app(ReceiverConfig(ledger_url, fal_sim.jwks_url))) as receiver:
        env = {
            **os.environ,
            **fal_sim.env,
            "FAL_KEY": CANARY_KEY + "\n",
            "FAL_ADMIN_KEY": ADMIN_KEY + "\n",
            "RENDERQUEUE_FAL_API_URL": fal_billing.api_url,
            "RENDERQUEUE_WEBHOOK_URL": f"{receiver}/webhooks/fal",
            "DATABASE_URL": ledger_url,
            "RENDERQUEUE_HOME": str(home),
        }
        env.pop("RENDERQUEUE_STORAGE_URL", None)
        run = subprocess.run(
            [sys.executable, "-m", "renderqueue_pipeline.cli", "demo", "--headless"],
            env=env,
            capture_output=True,
            text=True,
            timeout=360,
        )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "generations ended; outputs archived" in run.stdout
    needles = (CANARY_ID, CANARY_SECRET, ADMIN_KEY)
    text = run.stdout + run.stderr
    for file in home.rglob("*"):
        if file.is_file() and file.suffix in (".log", ".txt", ".yaml", ".json", ".csv"):
            text += file.read_text(errors="replace")
    assert [n for n in needles if n in text] == []
    assert _hits_in_database(ledger_url, needles) == []
    storage = dagster_storage_url(ledger_url).replace("postgresql+psycopg2", "postgresql")
    assert _hits_in_database(storage, needles) == []


@pytest.mark.timeout(600)
@pytest.mark.e2e
def test_the_production_shape_stack_with_a_canary_key_leaves_it_nowhere(
    fal_sim: RunningSimulator,
    ledger_url: str,
    conn: psycopg.Connection,
    tmp_path: Path,
    settings_env: Callable[..., None],
    dev_logins_lock: None,
) -> None:
    """Code server, webserver, daemon and two receivers as separate processes, FAL_KEY a
    newline-terminated canary: a launchpad run that submits, one that meets fal's 401;
    then every log file of every process, the ledger and Dagster's storage are searched."""

    home = tmp_path / "home"
    approved = tmp_path / "approved"
    approved.mkdir()
    fal_sim.control.set_faults(fal_key=CANARY_KEY)  # the canary account
    settings_env(
        **{
            **fal_sim.env,
            "FAL_ADMIN_KEY": None,  # no Platform API here: fal's request list not read
            "FAL_KEY": CANARY_KEY + "\n",
            "DATABASE_URL": ledger_url,
            "RENDERQUEUE_HOME": str(home),
            "RENDERQUEUE_PROMPT_SOURCES": approved.as_uri(),
            "RENDERQUEUE_WEBHOOK_URL": None,
        }
    )
    ui, code, hook_a, hook_b = _free_ports(4)
    with running_stack(
        home,
        console=Console(quiet=True),
        ui_port=ui,
        webhook_ports=(hook_a, hook_b),
        code_server_port=code,
    ):
        base = f"http://127.0.0.1:{ui}"
        repo = _wait_for_location(base)["locationOrLoadError"]["repositories"][0]

        def launch(name: str) -> str:
            file = write_csv(approved / name, prompts(3, tag=name))
            launched = _graphql(
                base,
                LAUNCH,
                {
                    "selector": {
                        "repositoryLocationName": "renderqueue",
                        "repositoryName": repo["name"],
                        "jobName": "submit_batch",
                    },
                    "config": {
                        "ops": {
                            "submit_prompts_file": {
                                "config": {"file_url": file.as_uri(), "default_endpoint": SEEDANCE}
                            }
                        }
                    },
                },
            )["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            return wait_for_run(base, launched["run"]["runId"])

        assert launch("ok.csv") == "SUCCESS"
        fal_sim.control.set_faults(fal_key="not-the-canary-key")
        assert launch("unauthorized.csv") == "FAILURE"
    needles = (CANARY_ID, CANARY_SECRET)
    text = ""
    for file in home.rglob("*"):
        if file.is_file() and file.suffix in (".log", ".txt", ".yaml", ".json", ".out", ".err"):
            text += file.read_text(errors="replace")
    logs = {file.name for file in (home / "logs").glob("*.log")}
    assert {"code-server.log", "dagster-daemon.log", "webhook-1.log", "webhook-2.log"} <= logs
    assert [n for n in needles if n in text] == []
    assert _hits_in_database(ledger_url, needles) == []
    storage = dagster_storage_url(ledger_url).replace("postgresql+psycopg2", "postgresql")
    assert _hits_in_database(storage, needles) == []
    batch = conn.execute("select error from batches where source like '%unauthorized.csv'")
    assert "FAL_KEY" in batch.fetchone()["error"]
