"""fal's CDN, error paths and request headers, as the simulator plays them by default."""

from __future__ import annotations

import json
import ssl
import time

import fal_client
import httpx
import pytest
from fal_client.client import FalClientHTTPError

from renderqueue_pipeline.simulator.models import OutputFile, file_bytes, file_chunks
from renderqueue_pipeline.simulator.testing import RunningSimulator, WebhookSink, wait_until

ENDPOINT = "bytedance/seedance-2.0/text-to-video"
INPUTS = {"prompt": "a tram crossing a bridge at dusk", "duration": "5", "resolution": "480p"}
LIFECYCLE = "X-Fal-Object-Lifecycle-Preference"

pytestmark = [pytest.mark.timeout(120), pytest.mark.e2e]  # real fal-client over TLS, fault by fault


def http(sim: RunningSimulator) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=sim.ca_bundle), timeout=60)


def lifecycle(seconds: float | None) -> dict[str, str]:
    return {LIFECYCLE: json.dumps({"expiration_duration_seconds": seconds})}


# ----- CDN -----------------------------------------------------------------------------------


def test_output_urls_are_public_stable_and_die_with_the_lifecycle(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    handle = fal_client.submit(
        ENDPOINT, arguments=INPUTS, webhook_url=webhook_sink.url, headers=lifecycle(2)
    )
    url = handle.get()["video"]["url"]
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id), timeout=30)
    assert hook.json()["payload"]["video"]["url"] == url  # the same URL in webhook and result
    assert handle.get()["video"]["url"] == url  # and on every fetch
    assert "?" not in url  # public: nothing signed
    truth = fal_sim.control.ground_truth(handle.request_id)
    assert truth["file_expires_at"] == pytest.approx(truth["finished_at"] + 2, abs=0.01)
    with http(fal_sim) as client:
        first = client.get(url)  # no credentials needed
        assert first.status_code == 200
        assert len(first.content) == truth["file_size"]
        time.sleep(max(0.0, truth["file_expires_at"] - time.time() + 0.1))
        assert client.get(url).status_code == 404
        assert client.head(url).status_code == 404
    assert handle.get()["video"]["url"] == url  # the result still names the dead URL


def test_lifecycle_defaults_and_no_expiry(fal_sim: RunningSimulator) -> None:
    default = fal_client.submit(ENDPOINT, arguments=INPUTS)
    forever = fal_client.submit(ENDPOINT, arguments=INPUTS, headers=lifecycle(None))
    default.get(), forever.get()
    truth = fal_sim.control.ground_truth(default.request_id)
    assert truth["object_lifetime"] == 7 * 86400  # the simulator's account default
    assert truth["file_expires_at"] == pytest.approx(truth["finished_at"] + 7 * 86400, abs=0.01)
    truth = fal_sim.control.ground_truth(forever.request_id)
    assert truth["object_lifetime"] is None
    assert truth["file_expires_at"] is None
    with pytest.raises(FalClientHTTPError) as err:
        fal_client.submit(ENDPOINT, arguments=INPUTS, headers={LIFECYCLE: "7 days"})
    assert err.value.status_code == 422


def add_file(sim: RunningSimulator, size: int, **spec: object) -> str:
    return add_file_info(sim, size, **spec)["url"]


def add_file_info(sim: RunningSimulator, size: int, **spec: object) -> dict:
    return sim.control.add_file(size, **spec)  # type: ignore[arg-type]


def test_head_and_byte_ranges(fal_sim: RunningSimulator) -> None:
    size = 300_007  # not a multiple of the generator's block
    url = add_file(fal_sim, size)
    with http(fal_sim) as client:
        whole = client.get(url)
        head = client.head(url)
        assert head.headers["content-length"] == str(size)
        assert head.headers["accept-ranges"] == "bytes"
        assert head.headers["content-type"] == "video/mp4"
        assert len(whole.content) == size
        assert whole.content[4:8] == b"ftyp"
        for header, first, last in [
            ("bytes=0-99", 0, 99),
            ("bytes=65530-65545", 65530, 65545),  # across a block boundary
            ("bytes=300000-", 300_000, size - 1),
            ("bytes=-7", size - 7, size - 1),
            ("bytes=299990-999999", 299_990, size - 1),
        ]:
            part = client.get(url, headers={"Range": header})
            assert part.status_code == 206, header
            assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
            assert part.headers["content-length"] == str(last - first + 1)
            assert part.content == whole.content[first : last + 1], header
        bad = client.get(url, headers={"Range": f"bytes={size}-"})
        assert bad.status_code == 416
        assert bad.headers["content-range"] == f"bytes */{size}"
        assert client.get(url).content == whole.content  # deterministic


def test_a_1_gb_object_is_served_without_being_built(fal_sim: RunningSimulator) -> None:
    """Sizes and ranges of a huge file come at once: bytes are made per block on demand."""
    size = 1024**3
    info = add_file_info(fal_sim, size, lifetime=3600)
    url = info["url"]
    with http(fal_sim) as client:
        assert client.head(url).headers["content-length"] == str(size)
        tail = client.get(url, headers={"Range": "bytes=-1000"})
        middle = client.get(url, headers={"Range": "bytes=500000000-500000099"})
    assert tail.status_code == 206
    assert len(tail.content) == 1000
    file = OutputFile(info["file_id"], "", "video/mp4", size)
    assert tail.content == b"".join(file_chunks(file, size - 1000))
    assert middle.content == b"".join(file_chunks(file, 500_000_000, 500_000_099))


def test_streamed_bytes_match_the_generator(fal_sim: RunningSimulator) -> None:
    size = 5 * 1024 * 1024 + 3
    url = add_file(fal_sim, size)
    with http(fal_sim) as client, client.stream("GET", url) as response:
        received = b"".join(response.iter_bytes())
    assert len(received) == size
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    output = handle.get()["video"]
    with http(fal_sim) as client:
        body = client.get(output["url"]).content
    truth = fal_sim.control.ground_truth(handle.request_id)
    file_id = truth["output"]["video"]["url"].split("/")[-2]
    # a clip's MP4 header states the seconds it was produced with (= the seconds fal bills)
    seconds = truth["billed_seconds"]
    assert body == file_bytes(OutputFile(file_id, "", "video/mp4", output["file_size"], seconds))


# ----- fal's error paths -----------------------------------------------------------------------


def test_fal_json_500_is_not_retried_but_edge_errors_are(fal_sim: RunningSimulator) -> None:
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    handle.get()
    fal_sim.control.set_faults(api_500_rate=1.0)
    with pytest.raises(FalClientHTTPError) as err:
        handle.status()
    assert err.value.status_code == 500
    assert err.value.response.headers["x-fal-request-id"] == handle.request_id
    body = err.value.response.json()
    assert set(body) == {"detail", "error_type"}
    assert fal_sim.control.health()["api_faults"]["500"] == 1  # fal-client did not retry
    fal_sim.control.set_faults(api_500_rate=0.0, api_502_rate=0.3, api_504_rate=0.3)
    for _ in range(6):
        assert isinstance(handle.status(), fal_client.Completed)  # retried by fal-client
    faults = fal_sim.control.health()["api_faults"]
    assert faults["502"] + faults["504"] > 0


def test_not_started_within_start_timeout_is_a_504_user_timeout(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(queue_delay="30")
    handle = fal_client.submit(
        ENDPOINT, arguments=INPUTS, webhook_url=webhook_sink.url, start_timeout=1.5
    )
    with pytest.raises(FalClientHTTPError) as err:
        handle.get()
    assert err.value.status_code == 504
    assert err.value.response.headers["x-fal-request-timeout-type"] == "user"
    assert err.value.response.json()["error_type"] == "request_timeout"
    truth = fal_sim.control.ground_truth(handle.request_id)
    assert truth["status"] == "failed"
    assert truth["ending"] == "start_timeout"
    assert truth["started_at"] is None
    assert truth["billed_seconds"] == 0
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id), timeout=30)
    assert hook.json()["status"] == "ERROR"
    assert hook.json()["payload"] == err.value.response.json()


def test_a_running_request_can_go_back_to_the_queue(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(queue_delay="2", run_time="3", requeue_rate=1.0, requeue_limit=1)
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS, webhook_url=webhook_sink.url)
    seen: list[str] = []

    def record() -> bool:
        status = type(handle.status()).__name__
        if not seen or seen[-1] != status:
            seen.append(status)
        return status == "Completed"

    wait_until(record, timeout=60, interval=0.05)
    assert seen[-3:] == ["Queued", "InProgress", "Completed"]
    assert "InProgress" in seen[:-2]  # it ran, went back to the queue, ran again
    truth = fal_sim.control.ground_truth(handle.request_id)
    first, second = truth["gateway_request_ids"]
    assert first != second
    assert truth["decisions"]["requeues"] == 1
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id), timeout=30)
    assert hook.json()["gateway_request_id"] == second  # key on request_id, never on this
    assert hook.json()["status"] == "OK"


def test_priority_hint_and_store_io_are_accepted(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(result_ttl=1.0)
    kept = fal_client.submit(ENDPOINT, arguments=INPUTS, priority="low", hint="gpu-a")
    unstored = fal_client.submit(ENDPOINT, arguments=INPUTS, headers={"X-Fal-Store-IO": "0"})
    kept.get(), unstored.get()
    truth = fal_sim.control.ground_truth(kept.request_id)
    assert (truth["priority"], truth["runner_hint"], truth["store_io"]) == ("low", "gpu-a", True)
    finished = fal_sim.control.ground_truth(unstored.request_id)
    assert finished["store_io"] is False
    time.sleep(max(0.0, finished["finished_at"] + 1.1 - time.time()))
    with pytest.raises(FalClientHTTPError) as err:
        unstored.get()  # not stored: gone after the short result retention
    assert err.value.status_code == 404
    assert kept.get()["video"]["url"]  # stored payloads are kept (30 days by default)


def test_delete_io_deletes_payloads_and_output_files(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(admin_key="admin-secret")
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS)
    url = handle.get()["video"]["url"]
    endpoint = f"{fal_sim.base_url}/requests/delete_io/{handle.request_id}"
    with http(fal_sim) as client:
        assert client.put(endpoint, headers={"Authorization": "Key wrong"}).status_code == 401
        plain = {"Authorization": f"Key {fal_sim.fal_key}"}
        assert client.put(endpoint, headers=plain).status_code == 403
        answer = client.put(endpoint, headers={"Authorization": "Key admin-secret"})
        assert answer.status_code == 200
        assert answer.json() == {"CDN_DELETE_RESULTS": [{"link": url, "exception": None}]}
        assert client.get(url).status_code == 404
        again = client.put(endpoint, headers={"Authorization": "Key admin-secret"}).json()
        assert again["CDN_DELETE_RESULTS"][0]["exception"]  # already gone: fal says why
        missing = client.put(
            f"{fal_sim.base_url}/requests/delete_io/nope",
            headers={"Authorization": "Key admin-secret"},
        )
        assert missing.status_code == 404
    with pytest.raises(FalClientHTTPError) as err:
        handle.get()
    assert err.value.status_code == 404
    assert fal_sim.control.ground_truth(handle.request_id)["payloads_deleted"]


# ----- account concurrency cap and queue priority --------------------------------------------


def test_under_a_cap_of_2_a_normal_request_submitted_after_low_ones_starts_next(
    fal_sim: RunningSimulator,
) -> None:
    fal_sim.control.set_faults(concurrency_limit=2, queue_delay="0", run_time="0.6")
    lows = [fal_client.submit(ENDPOINT, arguments=INPUTS, priority="low") for _ in range(5)]
    normal = fal_client.submit(ENDPOINT, arguments=INPUTS, priority="normal")
    handles = [*lows, normal]
    for handle in handles:
        fal_sim.control.wait_finished(handle.request_id)
    truth = [fal_sim.control.ground_truth(h.request_id) for h in handles]
    low_truth, normal_truth = truth[:-1], truth[-1]
    assert [t["priority"] for t in truth] == ["low"] * 5 + ["normal"]
    # the normal request waited behind the two running lows only, not behind the queued ones
    waiting_lows = [t for t in low_truth if t["started_at"] > low_truth[1]["finished_at"] - 0.05]
    assert len(waiting_lows) == 3
    assert all(normal_truth["started_at"] <= t["started_at"] for t in waiting_lows)
    # FIFO inside one priority
    starts = [t["started_at"] for t in low_truth]
    assert starts == sorted(starts)
    # never more than 2 at once: every start after the second waited for a finish
    ordered = sorted(truth, key=lambda t: t["started_at"])
    finishes = sorted(t["finished_at"] for t in truth)
    for k, entry in enumerate(ordered[2:]):
        assert entry["started_at"] >= finishes[k] - 0.05
    # the queue wait is visible and matches the timestamps
    assert normal_truth["queue_wait"] == pytest.approx(
        normal_truth["started_at"] - normal_truth["submitted_at"]
    )
    assert normal_truth["queue_wait"] >= 0.5


def test_a_request_waiting_for_a_slot_past_its_start_timeout_times_out(
    fal_sim: RunningSimulator,
) -> None:
    fal_sim.control.set_faults(concurrency_limit=1, queue_delay="0", run_time="5")
    running = fal_client.submit(ENDPOINT, arguments=INPUTS)
    waiting = fal_client.submit(ENDPOINT, arguments=INPUTS, start_timeout=1.5)
    with pytest.raises(FalClientHTTPError) as err:
        waiting.get()
    assert err.value.status_code == 504
    truth = fal_sim.control.ground_truth(waiting.request_id)
    assert truth["ending"] == "start_timeout"
    assert truth["started_at"] is None
    assert fal_sim.control.ground_truth(running.request_id)["status"] == "in_progress"
    fal_sim.control.set_faults(concurrency_limit=None)
