"""Server faults with real `clipscope-explorer serve` processes on one index file.

- Two servers on one index at once: both answer (the file is opened read-only and shared).
- The index replaced while serving (`os.replace` of another file over its path, even a broken one): the
  server keeps serving the index it opened (it holds the old inode) until its workers restart; image
  URLs carry the index id, so an image URL names the same bytes everywhere or is a 404.
- A rolling restart (`kill -HUP` to the serving process, `--workers 2`) opens the new file worker by
  worker without a failed request; a broken file swapped in is refused by the new worker, and the old
  workers keep serving.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.app.conftest import build_index
from tests.e2e.conftest import run_server

# One client (creating one per request costs ~20 ms), no keep-alive: each request opens a new connection,
# so the kernel hands requests to both workers.
HTTP = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def index_id(base: str) -> str:
    return HTTP.get(base + "/api").json()["index"]["index_id"]


def every_worker_serves(base: str, wanted: str, timeout: float) -> bool:
    """True once 12 requests in a row, each on a new connection (so both workers answer some), see `wanted`."""
    deadline, streak = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        streak = streak + 1 if index_id(base) == wanted else 0
        if streak >= 12:
            return True
        time.sleep(0.05)
    return False


def urls(base: str, layer: int) -> list[str]:
    """Every feature's JSON and every top image of a layer (thumbnail and overlay): reads all over the file."""
    found = []
    for feature in range(0, 64, 4):
        data = HTTP.get(f"{base}/api/layers/{layer}/features/{feature}").json()
        found.append(f"/api/layers/{layer}/features/{feature}")
        found += [url for image in data["top_images"] for url in (image["thumbnail_url"], image["overlay_url"])]
    return found


def test_two_servers_one_index_and_a_swap_while_serving(tmp_path):
    served = build_index(tmp_path / "index.duckdb")
    other = build_index(tmp_path / "next.duckdb")  # another build: same schema, another index id
    processes: list = []
    log = tmp_path / "first.log"
    first = run_server(
        served,
        "--workers",
        "2",
        "--no-live",
        "--upload-store",
        str(tmp_path / "up1"),
        log_path=log,
        processes=processes,
    )
    second = run_server(served, "--no-live", "--upload-store", str(tmp_path / "up2"), log_path=tmp_path / "second.log")
    a, b = next(first), next(second)
    try:
        old_id = index_id(a)
        assert index_id(b) == old_id  # two servers, one file, both answer
        before = {url: HTTP.get(a + url).content for url in urls(a, 20)}

        garbage = served.with_name("garbage.duckdb")
        garbage.write_bytes(os.urandom(1 << 16))
        os.replace(garbage, served)  # a broken file where the index was: nothing reads it by path
        for base in (a, b):
            assert index_id(base) == old_id
            for url, body in before.items():
                response = HTTP.get(base + url)
                assert response.status_code == 200 and response.content == body, url
            for url in urls(base, 11):  # pages never read before: served from the open (old) file
                assert HTTP.get(base + url).status_code == 200, url

        pid = processes[0].pid
        os.kill(pid, signal.SIGHUP)  # the new worker refuses the broken file; the old ones stay
        deadline = time.monotonic() + 60
        while "aborting the restart" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "aborting the restart" in log.read_text()
        assert "clipscope-explorer: error: cannot open" in log.read_text()  # the new worker's one line
        assert every_worker_serves(a, old_id, 10)

        new_id = index_id_of(other)
        os.replace(other, served)
        answered, failures = [], []
        stop = threading.Event()

        def browse() -> None:
            with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as own:
                while not stop.is_set():
                    try:
                        response = own.get(a + "/api/layers/20/features/8")
                    except httpx.TransportError as error:
                        failures.append(repr(error))
                    else:
                        (answered if response.status_code == 200 else failures).append(response.status_code)

        browser = threading.Thread(target=browse)
        browser.start()
        os.kill(pid, signal.SIGHUP)  # rolling restart: each new worker opens the new file before an old one stops
        try:
            assert every_worker_serves(a, new_id, 60)
        finally:
            stop.set()
            browser.join()
        assert failures == [] and len(answered) > 20

        thumbnail = next(url for url in before if url.endswith(".jpg"))
        renamed = thumbnail.replace(old_id, new_id)
        assert HTTP.get(a + thumbnail).status_code == 404  # old URLs name nothing on the new index
        assert HTTP.get(a + renamed).status_code == 200
        assert HTTP.get(b + thumbnail).content == before[thumbnail]  # not restarted: still the old
        assert HTTP.get(b + renamed).status_code == 404
    finally:
        first.close()
        second.close()


def index_id_of(path: Path) -> str:
    from clipscope_explorer.app.queries import open_index

    index = open_index(path)
    try:
        return index.index_id
    finally:
        index.close()
