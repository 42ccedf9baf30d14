"""One way to configure (issue 20): resources from the environment, never run config;
settings read only by entry points, never at import time."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.snap.snap_to_yaml import default_values_yaml_from_type_snap

import renderqueue_pipeline
from renderqueue_pipeline.batch import SubmitOptions, submit_batch_file
from renderqueue_pipeline.definitions import defs as load_defs
from renderqueue_pipeline.defs.resources import env_resources
from renderqueue_pipeline.reconcile import ReconcileOptions, reconcile
from renderqueue_pipeline.settings import ConfigError, Settings

PACKAGE = Path(renderqueue_pipeline.__file__).parent


def launchpad_scaffold(job: dg.JobDefinition) -> dict:
    """The run config the launchpad opens with (GraphQL `runConfigSchema.rootDefaultYaml`)."""
    snapshot = job.get_job_snapshot()
    schema = snapshot.config_schema_snapshot
    root = schema.get_config_snap(snapshot.mode_def_snaps[0].root_config_key)
    return yaml.safe_load(default_values_yaml_from_type_snap(schema, root))


def test_the_launchpad_offers_only_what_the_data_team_chooses(monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://rq:hunter2@127.0.0.1:1/ledger")
    monkeypatch.setenv("FAL_ADMIN_KEY", "admin-secret-value")
    definitions = load_defs()
    submit = definitions.resolve_job_def("submit_batch")
    assert launchpad_scaffold(submit) == {
        "ops": {
            "submit_prompts_file": {
                "config": {
                    "concurrency": 16,
                    "content_version": "",
                    "priority": "low",
                    "resubmit_unknown": False,
                }
            }
        },
    }
    for job in definitions.resolve_all_job_defs():
        scaffold = json.dumps(launchpad_scaffold(job))
        for text in ("DATABASE_URL", "hunter2", "admin-secret-value", "FAL_", "url"):
            assert text not in scaffold, (job.name, text)
        resources = job.run_config_schema.config_type.fields["resources"].config_type.fields
        for key in env_resources():
            if key in resources:  # the job uses it, and it has nothing to configure
                config = resources[key].config_type.fields["config"].config_type
                assert config.fields == {}, (job.name, key)


def test_run_config_cannot_carry_a_database_url_or_a_key() -> None:
    submit = load_defs().resolve_job_def("submit_batch")
    ops = {"submit_prompts_file": {"config": {"file_url": "prompts.csv"}}}
    dg.validate_run_config(submit, {"ops": ops})
    for key, field, value in (
        ("ledger", "url", "postgresql://rq:hunter2@127.0.0.1:1/ledger"),
        ("prompts_inbox", "url", "file:///elsewhere"),
    ):
        resources = {key: {"config": {field: value}}}
        with pytest.raises(
            dg.DagsterInvalidConfigError, match=f'unexpected config entry "{field}"'
        ):
            dg.validate_run_config(submit, {"ops": ops, "resources": resources})
    spend = load_defs().resolve_job_def("refresh_fal_prices")
    with pytest.raises(dg.DagsterInvalidConfigError, match='unexpected config entry "admin_key"'):
        dg.validate_run_config(
            spend, {"resources": {"fal_platform": {"config": {"admin_key": "secret"}}}}
        )


def test_resources_take_their_values_from_the_environment_when_a_run_starts(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("RENDERQUEUE_HOME", str(tmp_path))
    monkeypatch.delenv("RENDERQUEUE_PROMPTS_URL", raising=False)
    monkeypatch.setenv("FAL_ADMIN_KEY", "  admin-secret-value\n")  # a mounted secret's newline
    monkeypatch.setenv("RENDERQUEUE_FAL_API_URL", "https://127.0.0.1:9/v1")
    monkeypatch.setenv("RENDERQUEUE_ARCHIVE_BATCH_ROWS", "7")
    monkeypatch.setenv("RENDERQUEUE_ALERT_WEBHOOK_URL", "https://127.0.0.1:9/hooks/T0/tok3n")
    monkeypatch.setenv("RENDERQUEUE_BILLING_GRACE_HOURS", "12")
    definitions = env_resources()  # built before the values change: read at run start
    monkeypatch.setenv("RENDERQUEUE_STORAGE_URL", f"file://{tmp_path / 'store'}")
    with dg.build_resources(dict(definitions)) as resources:
        assert resources.fal_platform.admin_key == "admin-secret-value"
        assert resources.fal_platform.api_url == "https://127.0.0.1:9/v1"
        assert "admin-secret-value" not in repr(resources.fal_platform)
        assert resources.prompts_inbox.url == (tmp_path / "prompts" / "inbox").resolve().as_uri()
        assert resources.report_storage.url == f"file://{tmp_path / 'store'}"
        assert resources.archive.storage_url == f"file://{tmp_path / 'store'}"
        assert resources.archive.batch_rows == 7
        assert resources.archive.hosts == "v3.fal.media,v3b.fal.media,fal.media"  # the default
        assert resources.ledger.url == ""  # unset: the embedded server
        assert resources.alerts.webhook_url == "https://127.0.0.1:9/hooks/T0/tok3n"
        assert "tok3n" not in repr(resources.alerts)
        assert resources.alerts.default_percents() == (50, 80, 100)  # the default
        assert resources.billing_check.grace_hours == 12
        assert resources.billing_check.threshold_percent == 0.5  # the default


def test_a_bad_value_fails_the_run_naming_the_variable_not_the_value(monkeypatch) -> None:
    monkeypatch.setenv("RENDERQUEUE_ARCHIVE_BATCH_ROWS", "0")
    with (
        pytest.raises(dg.DagsterResourceFunctionError) as raised,
        dg.build_resources({"archive": env_resources()["archive"]}),
    ):
        pass
    assert isinstance(raised.value.__cause__, ConfigError)
    assert "RENDERQUEUE_ARCHIVE_BATCH_ROWS" in str(raised.value.__cause__)
    monkeypatch.delenv("RENDERQUEUE_ARCHIVE_BATCH_ROWS")
    monkeypatch.setenv("FAL_ADMIN_KEY", "admin\tsecret")
    with (
        pytest.raises(dg.DagsterResourceFunctionError) as raised,
        dg.build_resources({"fal_platform": env_resources()["fal_platform"]}),
    ):
        pass
    assert "FAL_ADMIN_KEY" in str(raised.value.__cause__)
    assert "secret" not in str(raised.value.__cause__)


# Read at import time by a module of ours: found by replacing os.environ with a recorder
# in a fresh interpreter, then importing every module of the package.
IMPORT_PROBE = r"""
import importlib, json, os, sys, sysconfig

import renderqueue_pipeline
from renderqueue_pipeline import settings

PACKAGE = os.path.dirname(renderqueue_pipeline.__file__)
STDLIB = sysconfig.get_paths()["stdlib"]
reads = []


def reader(skip=()):
    # the first frame outside the standard library, when it is one of ours (a read by a
    # library we import, e.g. pydantic's PYDANTIC_DISABLE_PLUGINS, is not ours)
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(STDLIB) or name.startswith("<frozen") or name in skip):
            if name.startswith(PACKAGE):
                return f"{os.path.relpath(name, PACKAGE)}:{frame.f_lineno}"
            return None
        frame = frame.f_back
    return None


original_init = settings.Settings.__init__


def recorded_init(self, *args, **kwargs):
    # Settings() reads the environment through pydantic-settings: the caller is the reader
    frame, where = sys._getframe(1), None
    while frame is not None and where is None:
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE) and name != settings.__file__:
            where = f"{os.path.relpath(name, PACKAGE)}:{frame.f_lineno}"
        frame = frame.f_back
    reads.append(f"{where} Settings()")
    original_init(self, *args, **kwargs)


settings.Settings.__init__ = recorded_init


class Recorder(type(os.environ)):
    def __getitem__(self, key):
        where = reader()
        if where:
            reads.append(f"{where} {key}")
        return super().__getitem__(key)

    def __iter__(self):
        where = reader()
        if where:
            reads.append(f"{where} (all)")
        return super().__iter__()


recorder = Recorder.__new__(Recorder)
recorder.__dict__.update(os.environ.__dict__)
os.environ = recorder
failed = []
# every file, namespace packages (folders without __init__.py) included
for root, _, files in sorted(os.walk(PACKAGE)):
    for file in sorted(files):
        if not file.endswith(".py") or file == "__main__.py":
            continue
        parts = os.path.relpath(os.path.join(root, file[:-3]), PACKAGE).split(os.sep)
        name = ".".join(["renderqueue_pipeline", *[p for p in parts if p != "__init__"]])
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
print(json.dumps({"reads": reads, "failed": failed}))
"""


def test_importing_any_module_reads_no_environment() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"reads": [], "failed": []}


#: Modules that may read the environment or the process's settings: entry points (the
#: CLI, `dev`, `demo`, the receiver's app factory, the code location's resources), the
#: simulator (a program of its own) and the settings themselves. Every other module takes
#: explicit arguments. The second group still reads settings inside; each entry is a debt
#: to pay by passing the value down (kept exact: a module that stops reading must leave).
ALLOWED = {
    # entry points and their helpers
    "settings.py": "the settings",
    "cli.py": "entry point",
    "dev.py": "entry point",
    "demo.py": "entry point",
    "chaos.py": "entry point (runs the product in subprocesses with their environment)",
    "archive/cli.py": "entry point",
    "batch/cli.py": "entry point",
    "spend/cli.py": "entry point",
    "reconcile/cli.py": "entry point",
    "reports/forecast_cli.py": "entry point",
    "simulator/cli.py": "entry point",
    "webhook/cli.py": "entry point",
    "webhook/app.py": "the receiver's app factory",
    "batch/single.py": "entry point (submit_prompt: the Python API app code calls, set up by "
    "the environment like the CLI)",
    "defs/resources.py": "the code location's resources, from the environment",
    "dagster_home.py": "writes the Dagster instance for dev/demo",
    "db/server.py": "the embedded server of dev/demo under RENDERQUEUE_HOME",
    "redact.py": "hides the configured secrets' values, wherever they come from",
    "tls.py": "SSL_CERT_FILE, as Python's ssl reads it",
    # still reading settings inside (to move to explicit arguments)
}

SETTINGS_READERS = {"get_settings", "load_settings", "getenv", "environ", "putenv"}


def reads_settings(tree: ast.AST) -> list[int]:
    """Lines that call get_settings()/load_settings() or touch os.environ / os.getenv."""
    lines = []
    for node in ast.walk(tree):
        name = (
            node.id
            if isinstance(node, ast.Name)
            else node.attr
            if isinstance(node, ast.Attribute)
            else None
        )
        if name in SETTINGS_READERS:
            lines.append(node.lineno)
    return lines


def test_only_entry_points_read_settings_or_the_environment() -> None:
    readers = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        lines = reads_settings(ast.parse(path.read_text(), str(path)))
        if lines:
            readers[relative] = lines
    unexpected = {module: lines for module, lines in readers.items() if module not in ALLOWED}
    assert unexpected == {}, "pass the value down instead of reading settings here"
    stale = sorted(set(ALLOWED) - set(readers))
    assert stale == [], "no longer reads settings: remove it from ALLOWED"


@pytest.mark.parametrize(
    ("function", "arguments"),
    [
        (submit_batch_file, ("submit_options", "gateway_factory", "platform_factory")),
        (reconcile, ("options", "gateway_factory", "platform_factory")),
    ],
)
def test_the_domain_takes_its_environment_from_the_entry_point(
    function: Callable[..., object], arguments: tuple[str, ...]
) -> None:
    """No hidden fallback to the settings: the caller must pass what the environment says."""
    parameters = inspect.signature(function).parameters
    optional = [
        name for name in arguments if parameters[name].default is not inspect.Parameter.empty
    ]
    assert optional == []


def test_the_options_defaults_are_the_settings_defaults() -> None:
    """One place for a default: the options built from default settings equal the options'
    own defaults (ReconcileOptions) and hold the settings' values (SubmitOptions)."""
    settings = Settings.model_construct()  # the field defaults, no environment read
    assert ReconcileOptions.from_settings(settings) == ReconcileOptions()
    submit = SubmitOptions.from_settings(settings)
    assert submit.lease_seconds == Settings.model_fields["submit_lease_seconds"].default
    assert submit.max_queued == Settings.model_fields["fal_max_queued"].default


def test_fals_addresses_are_written_once() -> None:
    for address in ("api.fal.ai", "rest.alpha.fal.ai"):
        holders = [
            path.relative_to(PACKAGE).as_posix()
            for path in PACKAGE.rglob("*.py")
            if f"https://{address}" in path.read_text()
            and not path.relative_to(PACKAGE).as_posix().startswith("simulator/")
        ]
        assert holders == ["fal_defaults.py"], address
