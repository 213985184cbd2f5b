"""Concurrent uploads: all answered (200 or 503 with Retry-After), none lost or crossed between
clients, micro-batched in one worker; and the worker's admission control on its own."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from clipscope_explorer.app.live.batcher import Busy, MicroBatcher
from tests import image_cases as cases
from tests.app.conftest import live_app_client, wait_live

N_CLIENTS = 20


def image(seed: int) -> bytes:
    return cases.encode(cases.noisy((96 + seed, 80), seed=100 + seed), "PNG")


def post(client, data: bytes):
    return client.post("/api/encode", files={"file": ("x.png", data, "image/png")}, data={"top": "1000"})


def same_result(got: dict, expected: dict) -> None:
    assert got["upload_id"] == expected["upload_id"]
    for layer, data in expected["layers"].items():
        assert [f["feature"] for f in got["layers"][layer]["features"]] == [f["feature"] for f in data["features"]]
        np.testing.assert_allclose([f["activation"] for f in got["layers"][layer]["features"]],
                                   [f["activation"] for f in data["features"]], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def busy_client(live_index):
    """No store (every upload is encoded), a queue of 8, batches of up to 4."""
    with live_app_client(live_index, None, live_queue_size=8, live_batch_size=4) as client:
        wait_live(client)
        yield client


def test_concurrent_uploads_are_all_answered_and_never_crossed(busy_client):
    images = [image(n) for n in range(N_CLIENTS)]
    expected = [post(busy_client, data).json() for data in images]  # one at a time
    assert len({e["upload_id"] for e in expected}) == N_CLIENTS
    batcher = busy_client.app.state.live.encoder.batcher
    start = threading.Barrier(N_CLIENTS)

    def client(n: int):
        start.wait()
        return post(busy_client, images[n])

    with ThreadPoolExecutor(N_CLIENTS) as pool:
        responses = list(pool.map(client, range(N_CLIENTS)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= busy_client.app.state.settings.live_queue_size
    for n, response in enumerate(responses):
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1 and "busy" in response.json()["detail"]
        else:
            same_result(response.json(), expected[n])
    assert batcher.largest_batch > 1, "concurrent uploads were not batched"
    assert batcher.in_progress == 0


def test_a_full_queue_answers_503_with_retry_after(busy_client):
    encoder = busy_client.app.state.live.encoder
    gate = threading.Event()
    original = encoder.batcher._run_batch

    def held(jobs):
        gate.wait(30)
        return original(jobs)

    encoder.batcher._run_batch = held
    try:
        with ThreadPoolExecutor(8) as pool:
            waiting = [pool.submit(post, busy_client, image(50 + n)) for n in range(8)]
            deadline = time.monotonic() + 10
            while encoder.batcher.in_progress < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = post(busy_client, image(60))
            browse = busy_client.get("/layers/1/features/3")  # browsing is not held up by the queue
            gate.set()
            answered = [f.result(timeout=30) for f in waiting]
    finally:
        gate.set()
        encoder.batcher._run_batch = original
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert browse.status_code == 200
    assert [r.status_code for r in answered] == [200] * 8


def test_batcher_admission_and_errors():
    release = threading.Event()

    def run(jobs):
        release.wait(5)
        if "boom" in jobs:
            raise RuntimeError("boom")
        return [job * 2 for job in jobs]

    batcher = MicroBatcher(run, max_batch=4, capacity=2)
    try:
        with batcher.admit(), batcher.admit():
            with pytest.raises(Busy) as busy:
                with batcher.admit():
                    pass
            assert busy.value.retry_after >= 1
            futures = [batcher.submit(n) for n in (1, 2)]
            release.set()
            assert [f.result(5) for f in futures] == [2, 4]
        assert batcher.in_progress == 0
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit("boom").result(5)
        assert batcher.submit(21).result(5) == 42  # the worker survives a failed batch
    finally:
        release.set()
        batcher.close()
