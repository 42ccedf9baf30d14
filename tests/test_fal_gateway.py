"""The fal gateway against the simulator: the real fal_client.AsyncClient underneath."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.fal_gateway import (
    FalAuthError,
    FalGateway,
    FalNotFound,
    FalNotReady,
    FalRejected,
    FalSubmitOutcomeUnknown,
    FalUnavailable,
    Status,
    SubmitResult,
)
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
    while not (status := await fal.status(endpoint, request_id, with_logs=True)).done:
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
    assert done.succeeded and done.logs and done.metrics["inference_time"] > 0
    assert output["video"]["duration"] == 7.0
    (hook,) = wait_until(lambda: webhook_sink.for_request(submitted.request_id))
    assert hook.json()["payload"]["video"]["file_size"] == output["video"]["file_size"]
    truth = fal_sim.control.ground_truth(submitted.request_id)
    assert truth["endpoint"] == ENDPOINT and truth["billed_seconds"] == 7.0


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
    assert ENDPOINT in str(err.value) and "resolution" in str(err.value)
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
    assert done.done and not done.succeeded and done.error
    assert ENDPOINT in message and "HTTP 422" in message


def test_cancel_outcomes(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(queue_delay="5")

    async def main() -> None:
        async with gateway() as fal:
            queued = await fal.submit(ENDPOINT, INPUTS)
            assert await fal.cancel(ENDPOINT, queued.request_id) == "cancellation_requested"
            status = await fal.status(ENDPOINT, queued.request_id)
            assert status.done and status.error == "Request cancelled"
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
    assert "missing-id" in str(err.value) and ENDPOINT in str(err.value)


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

    assert run(main())["video"]["duration"] == 7.0
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
    assert ENDPOINT in message and "HTTP 500" in message
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


@pytest.mark.parametrize(("limit", "minimum", "maximum"), [(1, 0.6, 5.0), (4, 0.15, 0.45)])
def test_concurrency_is_bounded(
    fal_sim: RunningSimulator, limit: int, minimum: float, maximum: float
) -> None:
    fal_sim.control.set_faults(submit_latency="0.15")

    async def main() -> float:
        async with gateway(max_concurrency=limit) as fal:
            await fal.submit(ENDPOINT, INPUTS)  # warm the connection pool
            started = time.monotonic()
            await asyncio.gather(*(fal.submit(ENDPOINT, INPUTS) for _ in range(4)))
            return time.monotonic() - started

    elapsed = run(main())
    assert minimum <= elapsed <= maximum


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
    from renderqueue_pipeline.settings import load_settings

    monkeypatch.setenv("RENDERQUEUE_WEBHOOK_URL", "https://hooks.example.com/fal")
    settings = load_settings()
    fal = FalGateway.from_settings(settings, max_concurrency=3)
    assert fal.default_webhook_url == "https://hooks.example.com/fal"
    assert fal.max_concurrency == 3
    assert fal.queue_host == f"127.0.0.1:{fal_sim.port}"
