"""The fal gateway against the simulator: the real fal_client.AsyncClient underneath."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import fal_client.client as fal_internals
import psutil
import pytest

from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.fal_gateway import (
    DeletedFile,
    FalAuthError,
    FalGateway,
    FalNotFound,
    FalNotReady,
    FalQueueClient,
    FalRejected,
    FalRequestTimedOut,
    FalSubmitOutcomeUnknown,
    FalUnavailable,
    Status,
    SubmitResult,
    pooled_fal_client,
)
from renderqueue_pipeline.settings import ConfigError, load_settings
from renderqueue_pipeline.simulator.testing import RunningSimulator, WebhookSink, wait_until

ENDPOINT = "bytedance/seedance-2.0/fast/text-to-video"
APP = "bytedance/seedance-2.0"
INPUTS = {"prompt": "a red kite over dunes", "duration": "7", "resolution": "720p"}

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def gateway(**options: object) -> FalGateway:
    defaults: dict[str, object] = {"retry_initial": 0.01, "retry_max": 0.05}
    defaults.update(options)
    return FalGateway(**defaults)  # type: ignore[arg-type]


async def until_done(fal: FalGateway, request_id: str, endpoint: str = ENDPOINT) -> Status:
    # polls fal's status over HTTP: there is no event to wait on
    while not (status := await fal.status(endpoint, request_id, with_logs=True)).done:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return status


def test_submit_status_result_with_webhook(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    async def main() -> tuple[SubmitResult, Status, dict]:
        async with gateway() as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS, webhook_url=webhook_sink.url)
            first = await fal.status(ENDPOINT, submitted.request_id)
            assert first.state in ("queued", "in_progress")
            with pytest.raises(FalNotReady):
                await fal.result(ENDPOINT, submitted.request_id)
            done = await until_done(fal, submitted.request_id)
            return submitted, done, await fal.result(ENDPOINT, submitted.request_id)

    submitted, done, output = run(main())
    # status/result/cancel URLs drop the endpoint's subpath
    assert submitted.status_url.endswith(f"/{APP}/requests/{submitted.request_id}/status")
    assert submitted.webhook_url == webhook_sink.url
    assert done.succeeded
    assert done.logs
    assert done.metrics["inference_time"] > 0
    assert set(output["video"]) == {"url", "content_type", "file_name", "file_size"}
    (hook,) = wait_until(lambda: webhook_sink.for_request(submitted.request_id))
    assert hook.json()["payload"]["video"]["file_size"] == output["video"]["file_size"]
    truth = fal_sim.control.ground_truth(submitted.request_id)
    assert truth["endpoint"] == ENDPOINT
    assert truth["billed_seconds"] == 7.0


def test_default_webhook_url_is_used(fal_sim: RunningSimulator, webhook_sink: WebhookSink) -> None:
    async def main() -> SubmitResult:
        async with gateway(default_webhook_url=webhook_sink.url) as fal:
            return await fal.submit(ENDPOINT, INPUTS)

    submitted = run(main())
    assert fal_sim.control.ground_truth(submitted.request_id)["webhook_url"] == webhook_sink.url


def test_rejected_inputs_raise_fal_rejected(fal_sim: RunningSimulator) -> None:
    async def main() -> None:
        async with gateway() as fal:
            await fal.submit(ENDPOINT, {"prompt": "p", "resolution": "8k"})

    with pytest.raises(FalRejected) as err:
        run(main())
    assert err.value.status_code == 422
    assert err.value.endpoint == ENDPOINT
    assert ENDPOINT in str(err.value)
    assert "resolution" in str(err.value)
    assert isinstance(err.value, RenderqueueError)
    assert fal_sim.control.ground_truth() == []


def test_model_failure_surfaces_in_status_and_result(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(failure_rate=1.0)

    async def main() -> tuple[Status, str]:
        async with gateway() as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS)
            done = await until_done(fal, submitted.request_id)
            with pytest.raises(FalRejected) as err:
                await fal.result(ENDPOINT, submitted.request_id)
            assert err.value.request_id == submitted.request_id
            return done, str(err.value)

    done, message = run(main())
    assert done.done
    assert not done.succeeded
    assert done.error
    assert ENDPOINT in message
    assert "HTTP 422" in message


def test_cancel_outcomes(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(queue_delay="5")

    async def main() -> None:
        async with gateway() as fal:
            queued = await fal.submit(ENDPOINT, INPUTS)
            assert await fal.cancel(ENDPOINT, queued.request_id) == "cancellation_requested"
            status = await fal.status(ENDPOINT, queued.request_id)
            assert status.done
            assert status.error_type == "client_cancelled"
            assert await fal.cancel(ENDPOINT, queued.request_id) == "already_completed"
            with pytest.raises(FalNotFound) as err:
                await fal.cancel(ENDPOINT, "no-such-request")
            assert "no-such-request" in str(err.value)

    run(main())
    assert fal_sim.control.ground_truth()[0]["status"] == "canceled"


def test_unknown_request_status_is_not_found(fal_sim: RunningSimulator) -> None:
    async def main() -> None:
        async with gateway() as fal:
            await fal.status(ENDPOINT, "missing-id")

    with pytest.raises(FalNotFound) as err:
        run(main())
    assert err.value.request_id == "missing-id"
    assert "missing-id" in str(err.value)
    assert ENDPOINT in str(err.value)


def test_wrong_key_is_an_auth_error(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(fal_key="real-key")

    async def main(key: str) -> SubmitResult:
        async with gateway(key=key) as fal:
            return await fal.submit(ENDPOINT, INPUTS)

    with pytest.raises(FalAuthError):
        run(main("wrong-key"))
    assert run(main("real-key")).request_id


def test_500_on_reads_is_retried(fal_sim: RunningSimulator) -> None:
    async def main() -> dict:
        async with gateway(retry_attempts=10) as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS)
            await until_done(fal, submitted.request_id)
            fal_sim.control.set_faults(api_500_rate=0.4)  # draws replay from here: reproducible
            for _ in range(3):
                assert (await fal.status(ENDPOINT, submitted.request_id)).succeeded
            return await fal.result(ENDPOINT, submitted.request_id)

    assert run(main())["video"]["url"]
    assert fal_sim.control.health()["api_faults"]["500"] > 0


def test_persistent_500_on_reads_becomes_unavailable(fal_sim: RunningSimulator) -> None:
    async def main() -> str:
        async with gateway(retry_attempts=3) as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS)
            fal_sim.control.set_faults(api_500_rate=1.0)
            with pytest.raises(FalUnavailable) as err:
                await fal.status(ENDPOINT, submitted.request_id)
            assert err.value.request_id == submitted.request_id
            return str(err.value)

    message = run(main())
    assert ENDPOINT in message
    assert "HTTP 500" in message
    assert fal_sim.control.health()["api_faults"]["500"] == 3  # exactly retry_attempts


def test_submit_is_never_retried_on_500(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(api_500_rate=1.0)

    async def main() -> None:
        async with gateway(retry_attempts=5) as fal:
            await fal.submit(ENDPOINT, INPUTS)

    with pytest.raises(FalSubmitOutcomeUnknown) as err:
        run(main())
    fal_sim.control.set_faults(api_500_rate=0.0)
    (truth,) = fal_sim.control.ground_truth()  # enqueued once, never twice
    assert err.value.request_id == truth["request_id"]
    assert truth["request_id"] in str(err.value)


def test_transient_429_503_on_submit_are_absorbed(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(api_429_rate=0.25, api_503_rate=0.25)

    async def main() -> list[SubmitResult]:
        async with gateway() as fal:
            return list(await asyncio.gather(*(fal.submit(ENDPOINT, INPUTS) for _ in range(4))))

    results = run(main())
    assert len({r.request_id for r in results}) == 4
    assert len(fal_sim.control.ground_truth()) == 4
    faults = fal_sim.control.health()["api_faults"]
    assert faults["429"] + faults["503"] > 0


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_is_bounded(fal_sim: RunningSimulator, limit: int) -> None:
    """The simulator counts submits it is answering at once: never more than the limit."""
    fal_sim.control.set_faults(submit_latency="1.5")

    async def main() -> None:
        async with gateway(max_concurrency=limit) as fal:
            await asyncio.gather(*(fal.submit(ENDPOINT, INPUTS) for _ in range(limit + 1)))

    run(main())
    assert fal_sim.control.health()["submits_in_flight_peak"] == limit


def test_a_reset_counts_only_the_submits_answered_after_it(fal_sim: RunningSimulator) -> None:
    """A submit still being answered from before a reset (an earlier test's killed batch)
    does not count in the next test's concurrency figures, not even when it ends."""
    fal_sim.control.set_faults(submit_latency="2")

    async def slow_submit() -> None:
        async with gateway() as fal:
            await fal.submit(ENDPOINT, INPUTS)

    earlier = threading.Thread(target=lambda: run(slow_submit()))
    earlier.start()
    wait_until(lambda: fal_sim.control.health()["submits_in_flight"] == 1)
    fal_sim.control.reset(seed=0)
    assert fal_sim.control.health()["submits_in_flight_peak"] == 0
    earlier.join()
    health = fal_sim.control.health()
    assert (health["submits_in_flight"], health["submits_in_flight_peak"]) == (0, 0)


def test_a_second_burst_of_submits_reuses_the_first_bursts_connections(
    fal_sim: RunningSimulator,
) -> None:
    """One live connection per request in flight: no new TLS handshake per submit.

    httpx's default pool (which fal-client uses) keeps 20 idle connections, so at a fan-out
    of 32 the second burst would open 12 new ones.
    """
    fal_sim.control.set_faults(submit_latency="0.5")  # all 32 of a burst in flight at once

    def open_ports() -> set[int]:
        return {
            c.laddr.port
            for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == fal_sim.port and c.status == psutil.CONN_ESTABLISHED
        }

    async def main() -> tuple[set[int], set[int]]:
        async with gateway(max_concurrency=32) as fal:
            await asyncio.gather(*(fal.submit(ENDPOINT, INPUTS) for _ in range(32)))
            first = open_ports()
            await asyncio.gather(*(fal.submit(ENDPOINT, INPUTS) for _ in range(32)))
            return first, open_ports()

    theirs = open_ports()  # the test's own control client keeps a connection too
    first, second = run(main())
    first, second = first - theirs, second - theirs
    assert len(first) == 32
    assert second == first
    assert len(fal_sim.control.ground_truth()) == 64


def test_repr_and_errors_keep_the_key_secret(fal_sim: RunningSimulator) -> None:
    secret = "sk-super-secret-value"
    fal_sim.control.set_faults(fal_key="something-else")
    fal = gateway(key=secret)
    assert secret not in repr(fal)

    async def main() -> None:
        async with fal:
            await fal.submit(ENDPOINT, INPUTS)

    with pytest.raises(FalAuthError) as err:
        run(main())
    assert secret not in str(err.value)


def test_from_settings(fal_sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("RENDERQUEUE_WEBHOOK_URL", "https://hooks.example.com/fal")
    settings = load_settings()
    fal = FalGateway.from_settings(settings, max_concurrency=3)
    assert fal.default_webhook_url == "https://hooks.example.com/fal"
    assert fal.max_concurrency == 3
    assert fal.queue_host == f"127.0.0.1:{fal_sim.port}"


# ----- what every submit tells fal, and fal's answers the ledger must read right ---------------


def test_submit_sends_the_lifecycle_and_the_endpoints_start_timeout(
    fal_sim: RunningSimulator,
) -> None:
    async def main() -> tuple[SubmitResult, SubmitResult]:
        async with gateway(start_timeouts={ENDPOINT: 30}, object_lifetime=3600) as fal:
            timed = await fal.submit(ENDPOINT, INPUTS)
            other = await fal.submit("bytedance/seedance-2.0/text-to-video", INPUTS)
            return timed, other

    before = datetime.now(UTC)
    timed, other = run(main())
    truth = fal_sim.control.ground_truth(timed.request_id)
    assert (truth["object_lifetime"], truth["start_timeout"]) == (3600, 30)
    assert fal_sim.control.ground_truth(other.request_id)["start_timeout"] is None
    assert timed.start_timeout == 30
    assert other.start_timeout is None
    assert timed.fal_expires_at is not None
    assert before + timedelta(seconds=3600) <= timed.fal_expires_at
    assert timed.fal_expires_at <= datetime.now(UTC) + timedelta(seconds=3600)


def test_default_lifetime_is_seven_days(fal_sim: RunningSimulator) -> None:
    async def main() -> SubmitResult:
        async with gateway() as fal:
            return await fal.submit(ENDPOINT, INPUTS)

    submitted = run(main())
    assert fal_sim.control.ground_truth(submitted.request_id)["object_lifetime"] == 7 * 86400
    assert submitted.fal_expires_at is not None


def test_a_user_start_timeout_is_terminal_and_not_retried(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(queue_delay="30")

    async def main() -> tuple[Status, FalRequestTimedOut]:
        async with gateway(start_timeouts={ENDPOINT: 1.5}, retry_attempts=5) as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS)
            done = await until_done(fal, submitted.request_id)
            calls = fal_sim.control.health()["api_calls"]
            with pytest.raises(FalRequestTimedOut) as err:
                await fal.result(ENDPOINT, submitted.request_id)
            # status, status again (fal-client) and one result call: no retry of the 504
            assert fal_sim.control.health()["api_calls"] - calls == 3
            return done, err.value

    done, error = run(main())
    assert done.done
    assert not done.succeeded
    assert done.timed_out
    assert error.status_code == 504
    assert error.error_type == "request_timeout"


def test_a_requeued_request_is_not_terminal(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(queue_delay="2", run_time="3", requeue_rate=1.0, requeue_limit=1)

    async def main() -> list[str]:
        states: list[str] = []
        async with gateway() as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS)
            while True:
                status = await fal.status(ENDPOINT, submitted.request_id)
                if not states or states[-1] != status.state:
                    states.append(status.state)
                if status.done:
                    assert status.succeeded
                    return states
                await asyncio.sleep(0.05)

    states = run(main())
    assert states[-1] == "completed"
    running = states.index("in_progress")
    assert "queued" in states[running:]  # back in the queue, and not done meanwhile


def test_delete_io_through_the_gateway(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(admin_key="the-admin-key")

    async def main() -> tuple[str, list[DeletedFile]]:
        async with gateway(admin_key="the-admin-key", rest_url=fal_sim.base_url) as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS)
            await until_done(fal, submitted.request_id)
            output = await fal.result(ENDPOINT, submitted.request_id)
            deleted = await fal.delete_io(submitted.request_id)
            with pytest.raises(FalNotFound):
                await fal.delete_io("no-such-request")
            return output["video"]["url"], deleted

    url, deleted = run(main())
    assert deleted == [DeletedFile(url, None)]
    assert deleted[0].deleted

    async def wrong_key() -> None:
        async with gateway(admin_key="not-admin", rest_url=fal_sim.base_url) as fal:
            await fal.delete_io("anything")

    with pytest.raises(FalAuthError) as err:
        run(wrong_key())
    assert "not-admin" not in str(err.value)


def test_settings_configure_lifetime_timeouts_and_admin_key(
    fal_sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setenv("RENDERQUEUE_FAL_OBJECT_LIFETIME", "none")
    monkeypatch.setenv("RENDERQUEUE_FAL_START_TIMEOUTS", f"{ENDPOINT}=120, fal-ai/veo3.1=300")
    monkeypatch.setenv("FAL_ADMIN_KEY", "admin-only")
    fal = FalGateway.from_settings(load_settings())
    assert fal.object_lifetime is None
    assert fal.start_timeouts == {ENDPOINT: 120.0, "fal-ai/veo3.1": 300.0}
    assert "admin-only" not in repr(fal)
    monkeypatch.setenv("RENDERQUEUE_FAL_START_TIMEOUTS", f"{ENDPOINT}=0.5")
    with pytest.raises(ConfigError, match="RENDERQUEUE_FAL_START_TIMEOUTS"):
        load_settings()


# ----- the seam: what the gateway relies on from fal-client ---------------------------------------


def test_the_fal_client_the_gateway_builds_has_every_method_of_the_seam() -> None:
    client = pooled_fal_client(None, timeout=5.0, connections=4)
    assert isinstance(client, FalQueueClient)


def test_fal_clients_private_helpers_keep_the_shape_result_once_calls() -> None:
    """`result_once` calls `_async_maybe_retry_request(client, method, url, timeout=...)` and
    `_raise_for_status(response)`; a fal-client release that renames or reshapes them fails
    here first, not in the reconciler."""

    retry = inspect.signature(fal_internals._async_maybe_retry_request).parameters
    assert list(retry)[:3] == ["client", "method", "url"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in retry.values())  # timeout=
    assert list(inspect.signature(fal_internals._raise_for_status).parameters) == ["response"]


def test_fetch_result_reads_a_finished_output_with_one_get(fal_sim: RunningSimulator) -> None:
    async def main() -> tuple[dict, dict, int]:
        async with gateway() as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS)
            await until_done(fal, submitted.request_id)
            before = fal_sim.control.health()["api_calls"]
            fetched = await fal.fetch_result(ENDPOINT, submitted.request_id)
            calls = fal_sim.control.health()["api_calls"] - before
            return fetched, await fal.result(ENDPOINT, submitted.request_id), calls

    fetched, polled, calls = run(main())
    assert fetched == polled
    assert fetched["video"]["url"]
    assert calls == 1  # no status poll before the GET


def test_fetch_result_rides_out_the_edges_429_and_503_inside_fal_client(
    fal_sim: RunningSimulator,
) -> None:
    async def main() -> list[dict]:
        async with gateway(retry_attempts=1) as fal:  # no retry of ours: only fal-client's
            submitted = await fal.submit(ENDPOINT, INPUTS)
            await until_done(fal, submitted.request_id)
            fal_sim.control.set_faults(api_429_rate=0.3, api_503_rate=0.3)  # draws replay
            return [await fal.fetch_result(ENDPOINT, submitted.request_id) for _ in range(3)]

    outputs = run(main())
    assert all(output["video"]["url"] for output in outputs)
    faults = fal_sim.control.health()["api_faults"]
    assert faults["429"] + faults["503"] > 0


def test_fetch_result_of_a_failed_or_unknown_request_raises_our_errors(
    fal_sim: RunningSimulator,
) -> None:
    fal_sim.control.set_faults(failure_rate=1.0)

    async def main() -> tuple[FalRejected, FalNotFound]:
        async with gateway() as fal:
            submitted = await fal.submit(ENDPOINT, INPUTS)
            await until_done(fal, submitted.request_id)
            with pytest.raises(FalRejected) as rejected:
                await fal.fetch_result(ENDPOINT, submitted.request_id)
            with pytest.raises(FalNotFound) as missing:
                await fal.fetch_result(ENDPOINT, "no-such-request")
            return rejected.value, missing.value

    rejected, missing = run(main())
    assert rejected.status_code == 422
    assert rejected.detail
    assert "no-such-request" in str(missing)
    assert ENDPOINT in str(missing)
