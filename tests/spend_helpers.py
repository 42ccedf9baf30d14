"""Fixtures and helpers of the spend tests: the simulator's Platform API and real submits.

Registered as a pytest plugin in tests/conftest.py: tests name `fal_billing` or `platform_server`
as a parameter and import only the plain helpers (`submit`, `settle`, `ADMIN_KEY`, ...).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from conftest import LEDGER_TABLES

from renderqueue_pipeline.fal_gateway import FalGateway, FalRejected
from renderqueue_pipeline.fal_platform import FalPlatform
from renderqueue_pipeline.ledger import LedgerEvent, record_events
from renderqueue_pipeline.ledger.core import _asubmit_generation
from renderqueue_pipeline.simulator.platform import (
    BillingBook,
    BillingConfig,
    PlatformServer,
    attach,
)
from renderqueue_pipeline.simulator.testing import RunningSimulator

ADMIN_KEY = "admin-secret-key"
SPEND_TABLES = ("fal_billing_events", "billing_reconciliation", "billing_reconciliation_days")


@dataclass
class FalBilling:
    """The Platform API simulator of a test: its book, its URL and a control client."""

    server: PlatformServer
    sim: RunningSimulator
    control: httpx.Client

    @property
    def book(self) -> BillingBook:
        return self.server.book

    @property
    def api_url(self) -> str:
        return self.server.api_url

    def platform(self, key: str = ADMIN_KEY, **options: Any) -> FalPlatform:
        return FalPlatform(key, base_url=self.api_url, retry_initial=0.01, **options)

    def configure(self, **knobs: Any) -> dict[str, Any]:
        response = self.control.patch("/_sim/billing/config", json=knobs)
        response.raise_for_status()
        return response.json()

    def set_price(self, endpoint: str, unit_price: float) -> list[dict[str, Any]]:
        response = self.control.put(
            "/_sim/billing/prices", json={"endpoint_id": endpoint, "unit_price": unit_price}
        )
        response.raise_for_status()
        return response.json()

    def add_events(self, events: list[dict[str, Any]]) -> None:
        body = {"billing_events": events}
        self.control.post("/_sim/billing/events", json=body).raise_for_status()

    def add_synthetic(self, **run: Any) -> None:
        self.control.post("/_sim/billing/synthetic", json=run).raise_for_status()


@pytest.fixture(scope="session")
def platform_server(fal_simulator: RunningSimulator) -> Iterator[PlatformServer]:
    server = PlatformServer(fal_simulator.home, BillingBook(BillingConfig(admin_key=ADMIN_KEY)))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fal_billing(
    fal_sim: RunningSimulator, platform_server: PlatformServer, conn: psycopg.Connection
) -> Iterator[FalBilling]:
    """The Platform API simulator, reset (seed prices, no knobs), billing what `fal_sim`
    completes; the spend tables and the price rows a test adds are removed afterwards."""
    book = platform_server.book
    book.reset(BillingConfig(admin_key=ADMIN_KEY))
    engine = fal_sim.server.app.state.engine
    if book.record_completion not in engine.finish_listeners:
        attach(engine, book)
    control = httpx.Client(
        base_url=platform_server.base_url,
        verify=ssl.create_default_context(cafile=fal_sim.ca_bundle),
    )
    try:
        yield FalBilling(platform_server, fal_sim, control)
    finally:
        control.close()
        conn.rollback()
        conn.execute(f"truncate {', '.join(SPEND_TABLES + LEDGER_TABLES)} restart identity cascade")
        conn.execute("delete from prices where source like 'fal Platform API%'")
        conn.commit()


def submit(conn: psycopg.Connection, endpoint: str, inputs: dict[str, Any]) -> str:
    """Submit through the ledger's real path (intent, gateway, simulator); the request id."""

    async def go() -> str:
        async with FalGateway() as gateway:

            async def call(endpoint: str, inputs: dict) -> str:
                return (await gateway.submit(endpoint, inputs)).request_id

            return await _asubmit_generation(
                conn,
                call,
                user_id=11,
                endpoint=endpoint,
                inputs=inputs,
                is_definite_rejection=lambda exc: isinstance(exc, FalRejected),
            )

    return asyncio.run(go())


def settle(conn: psycopg.Connection, sim: RunningSimulator, request_ids: list[str]) -> None:
    """Wait for the simulator to finish each request and record the outcome in the ledger
    (what the webhook receiver or the reconciler does)."""
    events = []
    for request_id in request_ids:
        truth = sim.control.wait_finished(request_id, timeout=30)
        if truth["status"] == "completed":
            events.append(LedgerEvent(request_id, "completed", truth["output"], source="api"))
        else:
            events.append(
                LedgerEvent(
                    request_id,
                    truth["status"],
                    truth["error"],
                    error="Invalid status code: 422",
                    source="api",
                )
            )
    record_events(conn, events)
    conn.commit()


def billed_month(fal_billing: FalBilling, request_ids: list[str]) -> str:
    """The UTC month ("YYYY-MM") fal billed these requests in, read from its bill rather
    than the clock (a run may cross a month end between the submits and the check)."""
    months = {
        dt.datetime.fromtimestamp(e.timestamp, dt.UTC).strftime("%Y-%m")
        for e in fal_billing.book.events()
        if e.request_id in request_ids
    }
    assert len(months) == 1, f"billed in {sorted(months)}: submitted across a month end"
    return months.pop()


def window() -> tuple[dt.datetime, dt.datetime]:
    """Yesterday, today and tomorrow (UTC days): a test near midnight stays inside."""
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - dt.timedelta(days=1), today + dt.timedelta(days=2)
