"""Unmodified fal-client (sync and async) against the simulator over real TLS."""

from __future__ import annotations

import asyncio
import ssl
import time

import fal_client
import httpx
import pytest
from fal_client.client import QUEUE_URL_FORMAT, FalClientHTTPError

from renderqueue_pipeline.simulator.testing import RunningSimulator, wait_until

ENDPOINT = "bytedance/seedance-2.0/text-to-video"
APP = "bytedance/seedance-2.0"
INPUTS = {"prompt": "a paper boat on a rainy street", "duration": "5", "resolution": "720p"}

pytestmark = pytest.mark.timeout(60)


def test_env_points_fal_client_at_the_simulator(fal_sim: RunningSimulator) -> None:

    assert f"https://127.0.0.1:{fal_sim.port}/" == QUEUE_URL_FORMAT
    assert fal_sim.env["FAL_QUEUE_RUN_HOST"] == f"127.0.0.1:{fal_sim.port}"


def test_sync_submit_status_result(fal_sim: RunningSimulator) -> None:
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    assert handle.status_url == f"{fal_sim.base_url}/{APP}/requests/{handle.request_id}/status"
    first = handle.status()
    assert isinstance(first, fal_client.Queued | fal_client.InProgress)

    seen: list[type] = []
    for event in handle.iter_events(with_logs=True, interval=0.01):
        seen.append(type(event))
        if isinstance(event, fal_client.InProgress | fal_client.Completed):
            assert isinstance(event.logs, list)
    assert seen[-1] is fal_client.Completed
    done = handle.status(with_logs=True)
    assert isinstance(done, fal_client.Completed)
    assert done.error is None
    assert done.logs
    assert done.logs[-1]["message"] == "Generation complete"
    assert {"message", "level", "source", "timestamp"} <= set(done.logs[0])
    assert done.metrics["inference_time"] > 0

    result = handle.get()
    video = result["video"]
    # exactly fal's documented output schema for Seedance 2.0: nothing fal does not send
    assert set(result) == {"video", "seed"}
    assert set(video) == {"url", "content_type", "file_name", "file_size"}
    assert video["content_type"] == "video/mp4"
    assert video["file_name"] == "output.mp4"
    assert video["file_size"] > 0
    truth = fal_sim.control.ground_truth(handle.request_id)
    assert truth["output_duration"] == 5.0
    assert truth["status"] == "completed"
    assert truth["billed_seconds"] == 5.0
    assert truth["output"]["video"]["file_size"] == video["file_size"]

    # the CDN serves exactly the declared bytes with the declared type
    with httpx.Client(verify=ssl.create_default_context(cafile=fal_sim.ca_bundle)) as http:
        download = http.get(video["url"])
    assert download.status_code == 200
    assert download.headers["content-type"] == "video/mp4"
    assert len(download.content) == video["file_size"]
    assert download.content[4:8] == b"ftyp"


def test_status_without_logs_has_null_logs(fal_sim: RunningSimulator) -> None:
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    handle.get()
    status = handle.status(with_logs=False)
    assert isinstance(status, fal_client.Completed)
    assert status.logs is None
    with httpx.Client(verify=ssl.create_default_context(cafile=fal_sim.ca_bundle)) as http:
        raw = http.get(
            handle.status_url,
            headers={"Authorization": f"Key {fal_sim.fal_key}"},
            params={"logs": 1},
        )
    assert raw.status_code == 200
    assert raw.json()["status"] == "COMPLETED"
    assert isinstance(raw.json()["logs"], list)


def test_in_progress_status_is_202_with_logs(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(queue_delay="0", run_time="2")
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    with httpx.Client(verify=ssl.create_default_context(cafile=fal_sim.ca_bundle)) as http:
        raw = wait_until(
            lambda: (
                r
                if (
                    r := http.get(
                        handle.status_url, headers={"Authorization": f"Key {fal_sim.fal_key}"}
                    )
                ).json()["status"]
                == "IN_PROGRESS"
                else None
            ),
            timeout=30,
        )
    assert raw.status_code == 202
    assert "logs" in raw.json()
    status = handle.status(with_logs=True)
    assert isinstance(status, fal_client.InProgress)
    assert status.logs
    assert status.logs[0]["message"].startswith("Starting generation")


def test_queue_position_counts_requests_ahead(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(queue_delay="5", run_time="0.1")
    handles = [fal_client.submit(ENDPOINT, arguments=INPUTS) for _ in range(3)]
    positions = [h.status().position for h in handles]  # type: ignore[attr-defined]
    assert positions == [0, 1, 2]
    for handle in handles:
        handle.cancel()


def test_async_client_end_to_end(fal_sim: RunningSimulator) -> None:
    async def main() -> tuple[dict, list]:
        client = fal_client.AsyncClient()
        handle = await client.submit(ENDPOINT, arguments=INPUTS)
        events = [e async for e in handle.iter_events(with_logs=True, interval=0.01)]
        result = await handle.get()
        again = await client.result(ENDPOINT, handle.request_id)
        assert again == result  # the same stable URL every time
        status = await client.status(ENDPOINT, handle.request_id, with_logs=False)
        assert isinstance(status, fal_client.Completed)
        return result, events

    result, events = asyncio.run(main())
    assert isinstance(events[-1], fal_client.Completed)
    assert set(result["video"]) == {"url", "content_type", "file_name", "file_size"}


def test_subscribe_and_run(fal_sim: RunningSimulator) -> None:
    result = fal_client.subscribe(ENDPOINT, arguments={**INPUTS, "duration": "8"})
    assert result["video"]["url"]
    image = fal_client.run("fal-ai/fast-sdxl", arguments={"prompt": "a cute cat"})
    assert set(image["images"][0]) == {"url", "width", "height", "content_type"}
    assert image["images"][0]["content_type"] == "image/jpeg"
    truths = fal_sim.control.ground_truth()
    assert [t["sync"] for t in truths] == [False, True]
    assert truths[0]["billed_seconds"] == 8.0


def test_auto_duration_is_billed_but_not_in_the_output(fal_sim: RunningSimulator) -> None:
    """fal bills what "auto" picked, but its output does not say how long the video is."""
    result = fal_client.subscribe(
        ENDPOINT, arguments={"prompt": "p", "duration": "auto", "resolution": "1080p"}
    )
    assert "duration" not in result["video"]
    assert "width" not in result["video"]
    truth = fal_sim.control.ground_truth()[0]
    assert 4 <= truth["billed_seconds"] <= 15
    assert truth["billed_seconds"] == truth["output_duration"]


def test_output_extras_knob_adds_what_fal_does_not_send(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(output_extras=True)
    result = fal_client.subscribe(
        ENDPOINT, arguments={"prompt": "p", "duration": "auto", "resolution": "1080p"}
    )
    video = result["video"]
    assert (video["width"], video["height"]) == (1920, 1080)
    assert video["duration"] == fal_sim.control.ground_truth()[0]["billed_seconds"]


@pytest.mark.parametrize(
    ("endpoint", "inputs", "keys"),
    [
        ("fal-ai/veo3.1", {"prompt": "p", "duration": "6s", "resolution": "4k"}, {"video"}),
        ("fal-ai/kling-video/v3/pro/text-to-video", {"prompt": "p", "duration": "12"}, {"video"}),
        ("bytedance/seedance-2.0/fast/text-to-video", {"prompt": "p"}, {"video", "seed"}),
    ],
)
def test_each_endpoint_returns_its_documented_output(
    fal_sim: RunningSimulator, endpoint: str, inputs: dict, keys: set[str]
) -> None:
    result = fal_client.subscribe(endpoint, arguments=inputs)
    assert set(result) == keys
    assert set(result["video"]) == {"url", "content_type", "file_name", "file_size"}


def test_cancel_queued_request_leaves_the_queue(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(queue_delay="10")
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    handle.cancel()  # 202 CANCELLATION_REQUESTED
    status = handle.status()
    assert isinstance(status, fal_client.Completed)
    assert status.error
    assert status.error_type == "client_cancelled"
    truth = fal_sim.control.ground_truth(handle.request_id)
    assert truth["status"] == "canceled"
    assert truth["billed_seconds"] == 0
    with pytest.raises(FalClientHTTPError) as err:
        handle.get()
    assert err.value.status_code == 499
    assert err.value.response.json()["error_type"] == "client_cancelled"


def test_cancel_of_a_running_request_is_only_a_signal(fal_sim: RunningSimulator) -> None:
    """fal signals the app; by default it finishes, returns its output and is billed."""
    fal_sim.control.set_faults(queue_delay="0", run_time="3")
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    wait_until(lambda: isinstance(handle.status(), fal_client.InProgress), timeout=30)
    handle.cancel()  # 202: accepted as a request, not a promise
    assert set(handle.get()["video"]) == {"url", "content_type", "file_name", "file_size"}
    truth = fal_sim.control.ground_truth(handle.request_id)
    assert truth["status"] == "completed"
    assert truth["cancel_requested"]
    assert truth["billed_seconds"] == 5.0


def test_cancel_stop_rate_makes_a_running_request_stop(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(queue_delay="0", run_time="5", cancel_stop_rate=1.0)
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    wait_until(lambda: isinstance(handle.status(), fal_client.InProgress), timeout=30)
    handle.cancel()
    status = handle.status()
    assert isinstance(status, fal_client.Completed)
    assert status.error_type == "client_cancelled"
    truth = fal_sim.control.ground_truth(handle.request_id)
    assert truth["status"] == "canceled"
    assert truth["billed_seconds"] == 0
    with pytest.raises(FalClientHTTPError) as err:
        handle.get()
    assert err.value.status_code == 499


def test_cancel_completed_and_unknown_requests(fal_sim: RunningSimulator) -> None:
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    handle.get()
    with pytest.raises(FalClientHTTPError) as err:
        handle.cancel()
    assert err.value.status_code == 400
    assert err.value.response.json() == {"status": "ALREADY_COMPLETED"}
    with pytest.raises(FalClientHTTPError) as err:
        fal_client.cancel(ENDPOINT, "00000000-0000-0000-0000-000000000000")
    assert err.value.status_code == 404
    assert err.value.response.json() == {"status": "NOT_FOUND"}


def test_status_urls_use_owner_and_app_only(fal_sim: RunningSimulator) -> None:
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    # fal_client builds owner/app URLs itself from the endpoint id
    assert isinstance(
        fal_client.status(ENDPOINT, handle.request_id), fal_client.Queued | fal_client.InProgress
    )
    with httpx.Client(verify=ssl.create_default_context(cafile=fal_sim.ca_bundle)) as http:
        auth = {"Authorization": f"Key {fal_sim.fal_key}"}
        wrong = http.get(f"{fal_sim.base_url}/{ENDPOINT}/requests/{handle.request_id}/status")
        assert wrong.status_code == 401  # auth is checked first
        wrong = http.get(
            f"{fal_sim.base_url}/{ENDPOINT}/requests/{handle.request_id}/status", headers=auth
        )
        assert wrong.status_code == 404
        other_app = http.get(
            f"{fal_sim.base_url}/other/app/requests/{handle.request_id}/status", headers=auth
        )
        assert other_app.status_code == 404


def test_missing_key_is_401(fal_sim: RunningSimulator) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=fal_sim.ca_bundle)) as http:
        response = http.post(f"{fal_sim.base_url}/{ENDPOINT}", json=INPUTS)
        assert response.status_code == 401
        response = http.post(
            f"{fal_sim.base_url}/{ENDPOINT}", json=INPUTS, headers={"Authorization": "Bearer x"}
        )
        assert response.status_code == 401


def test_required_key_is_enforced(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(fal_key="the-right-key")
    assert fal_sim.control.config()["fal_key"] == "***"
    with pytest.raises(FalClientHTTPError) as err:
        fal_client.SyncClient(key="wrong").submit(ENDPOINT, arguments=INPUTS)
    assert err.value.status_code == 401
    handle = fal_client.SyncClient(key="the-right-key").submit(ENDPOINT, arguments=INPUTS)
    assert handle.request_id


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"duration": "5"}, "prompt"),
        ({"prompt": "p", "duration": "3"}, "duration"),
        ({"prompt": "p", "duration": "16"}, "duration"),
        ({"prompt": "p", "duration": "five"}, "duration"),
        ({"prompt": "p", "resolution": "4k"}, "resolution"),
        ({"prompt": "p", "duration": 5}, "duration"),  # a string enum: 5 is not "5"
        ({"prompt": "p", "aspect_ratio": "2:1"}, "aspect_ratio"),
    ],
)
def test_invalid_inputs_are_422(
    fal_sim: RunningSimulator, inputs: dict[str, str], field: str
) -> None:
    with pytest.raises(FalClientHTTPError) as err:
        fal_client.submit(ENDPOINT, arguments=inputs)
    assert err.value.status_code == 422
    detail = err.value.response.json()["detail"]
    assert [item["loc"] for item in detail] == [["body", field]]
    assert fal_sim.control.ground_truth() == []  # nothing enqueued, nothing billed


@pytest.mark.parametrize(
    ("endpoint", "inputs", "field"),
    [
        (
            "bytedance/seedance-2.0/fast/text-to-video",
            {"prompt": "p", "resolution": "1080p"},
            "resolution",
        ),  # fast: 480p/720p only
        ("bytedance/seedance-2.0/text-to-video", {"prompt": "p", "resolution": "4k"}, "resolution"),
    ],
)
def test_inputs_are_rules_per_endpoint(
    fal_sim: RunningSimulator, endpoint: str, inputs: dict, field: str
) -> None:
    with pytest.raises(FalClientHTTPError) as err:
        fal_client.submit(endpoint, arguments=inputs)
    assert err.value.status_code == 422
    assert [item["loc"] for item in err.value.response.json()["detail"]] == [["body", field]]
    # the standard tier takes 1080p
    ok = fal_client.submit(
        "bytedance/seedance-2.0/text-to-video", arguments={"prompt": "p", "resolution": "1080p"}
    )
    assert ok.request_id


def test_an_endpoint_that_validates_at_run_time_fails_with_an_error_webhook(
    fal_sim: RunningSimulator, webhook_sink
) -> None:
    """Veo accepts the submit; the 422 comes as the ERROR webhook's payload and the result."""
    handle = fal_client.submit(
        "fal-ai/veo3.1", arguments={"prompt": "p", "duration": "5s"}, webhook_url=webhook_sink.url
    )
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id), timeout=30)
    body = hook.json()
    assert body["status"] == "ERROR"
    assert body["error"] == "Invalid status code: 422"
    assert body["payload"]["detail"][0]["loc"] == ["body", "duration"]
    with pytest.raises(FalClientHTTPError) as err:
        handle.get()
    assert err.value.status_code == 422
    assert err.value.response.json() == body["payload"]
    with pytest.raises(FalClientHTTPError):  # Seedance refuses the same mistake at submit
        fal_client.submit(ENDPOINT, arguments={"prompt": "p", "duration": "5s"})


def test_validation_at_run_time_fails_the_request(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(validation="run")
    handle = fal_client.submit(ENDPOINT, arguments={"prompt": "p", "duration": "30"})
    wait_until(lambda: isinstance(handle.status(), fal_client.Completed), timeout=30)
    status = handle.status()
    assert status.error  # type: ignore[attr-defined]
    with pytest.raises(FalClientHTTPError) as err:
        handle.get()
    assert err.value.status_code == 422
    assert err.value.response.json()["detail"][0]["loc"] == ["body", "duration"]


def test_failure_rate_gives_422_result_and_no_bill(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(failure_rate=1.0)
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    with pytest.raises(FalClientHTTPError) as err:
        handle.get()
    assert err.value.status_code == 422
    truth = fal_sim.control.ground_truth(handle.request_id)
    assert truth["status"] == "failed"
    assert truth["billed_seconds"] == 0
    assert truth["error"]["detail"][0]["type"] == "content_policy_violation"


def test_transient_429_and_503_are_retried_by_fal_client(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(api_429_rate=0.2, api_503_rate=0.2)
    handles = [fal_client.submit(ENDPOINT, arguments=INPUTS) for _ in range(3)]
    for handle in handles:
        assert handle.get()["video"]["url"]
    faults = fal_sim.control.health()["api_faults"]
    # fixed by seed 0: reproducible
    assert faults["429"] > 0
    assert faults["503"] > 0
    assert len(fal_sim.control.ground_truth()) == 3  # no duplicates from the retries


def test_500_on_submit_still_enqueues(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(api_500_rate=1.0)
    with pytest.raises(FalClientHTTPError) as err:
        fal_client.submit(ENDPOINT, arguments=INPUTS)
    assert err.value.status_code == 500
    fal_sim.control.set_faults(api_500_rate=0.0)
    (truth,) = fal_sim.control.ground_truth()
    assert truth["request_id"] == err.value.response.headers["x-fal-request-id"]


def test_signed_cdn_mode_expires_and_rejects_tampering(fal_sim: RunningSimulator) -> None:
    """The `signed` knob: another provider's style, kept for the archiver's tests."""
    fal_sim.control.set_faults(cdn_mode="signed", cdn_url_ttl=1.0)
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    url = handle.get()["video"]["url"]
    with httpx.Client(verify=ssl.create_default_context(cafile=fal_sim.ca_bundle)) as http:
        assert http.head(url).status_code == 200
        tampered = url.replace("size=", "size=1")
        assert http.get(tampered).status_code == 403
        assert http.get(url.split("?")[0]).status_code == 404
        expires = int(httpx.URL(url).params["exp"])
        time.sleep(max(0.0, expires - time.time() + 0.05))
        assert http.get(url).status_code == 403
        fresh = handle.get()["video"]["url"]  # the result endpoint re-signs
        first = http.get(fresh)
        assert first.status_code == 200
        assert http.get(fresh).content == first.content  # deterministic bytes


def test_namespaced_and_subpath_endpoints(fal_sim: RunningSimulator) -> None:
    result = fal_client.subscribe(
        "fal-ai/some-model/v2/text-to-video", arguments={"prompt": "p", "duration": "4"}
    )
    assert result["video"]["url"]
    truth = fal_sim.control.ground_truth()[0]
    assert truth["billed_seconds"] == 4.0
    assert truth["app"] == "fal-ai/some-model"
    assert truth["endpoint"] == "fal-ai/some-model/v2/text-to-video"
