"""Every outgoing HTTPS client shares one TLS context per CA bundle (renderqueue_pipeline/tls.py).

Loading a CA bundle the size of production's takes about 0.1 s; httpx does it for every
client it builds unless it is handed a context."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import certifi
import httpx
import pytest

from renderqueue_pipeline.simulator.testing import RunningSimulator
from renderqueue_pipeline.tls import ssl_context

PACKAGE = Path(__file__).resolve().parents[1] / "renderqueue_pipeline"
HTTPX_BUILDERS = {"Client", "AsyncClient", "HTTPTransport", "AsyncHTTPTransport"}


def test_the_same_bundle_gives_the_same_context_and_a_changed_one_a_new_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle.pem"
    shutil.copy(certifi.where(), bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    first = ssl_context()
    assert ssl_context() is first
    bundle.write_text(bundle.read_text() + "\n")  # a rewritten bundle (other size and time)
    assert ssl_context() is not first


def test_the_shared_context_trusts_the_simulators_ca_only_when_ssl_cert_file_names_it(
    fal_sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with httpx.Client(verify=ssl_context(), timeout=10) as client:
        assert client.get(f"{fal_sim.base_url}/_sim/health").status_code == 200
    monkeypatch.delenv("SSL_CERT_FILE")  # public roots only: the simulator is not trusted
    with (
        httpx.Client(verify=ssl_context(), timeout=10) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(f"{fal_sim.base_url}/_sim/health")


def test_every_https_client_the_package_builds_is_handed_the_shared_context() -> None:
    """An httpx client or transport built without `verify=` would load the bundle again
    (a client handed its `transport=` builds none: the transport holds the context)."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "simulator" in path.parts:  # the stand-in for fal serves TLS, it is not a client
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "httpx"
                and node.func.attr in HTTPX_BUILDERS
                and not any(k.arg in ("verify", "transport") for k in node.keywords)
            ):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert missing == []
