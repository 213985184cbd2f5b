"""Admission of uploads (each client's share of the live worker's slots, who counts as one client), the
share link an HTML upload redirects to, redirects that never repeat a forged `Host`, and the connection cap's
fit under the open-file limit. The slow and idle clients themselves are in tests/e2e/test_slow_clients.py."""

from __future__ import annotations

import re
import resource
import threading
from types import SimpleNamespace

import pytest

from clipscope_explorer.app.live.admission import client_key
from clipscope_explorer.app.live.batcher import Busy, ClientBusy, MicroBatcher
from clipscope_explorer.app.serving.security import relative_location
from clipscope_explorer.app.serving.transport import FD_RESERVE, connection_cap
from tests import image_cases as cases


@pytest.fixture()
def batcher():
    batcher = MicroBatcher(lambda jobs: list(jobs), max_batch=4, capacity=5)
    yield batcher
    batcher.close()


def test_one_client_holds_at_most_its_share_and_others_still_get_slots(batcher):
    with batcher.admit("a", 2), batcher.admit("a", 2):
        with pytest.raises(ClientBusy) as over:
            with batcher.admit("a", 2):
                pass
        assert over.value.share == 2 and over.value.retry_after >= 1
        with batcher.admit("b", 2), batcher.admit("b", 2), batcher.admit("c", 2):
            assert batcher.in_progress == 5
            with pytest.raises(Busy) as full:  # all slots taken: plain Busy, not this client's fault
                with batcher.admit("d", 2):
                    pass
            assert not isinstance(full.value, ClientBusy)
        with batcher.admit("a", 0):  # share 0: no per-client limit
            assert batcher.in_progress == 3
    assert batcher.in_progress == 0
    with batcher.admit("a", 2), batcher.admit("a", 2):  # released slots count again
        pass


def test_a_failing_upload_gives_its_slot_back(batcher):
    for _ in range(3):
        with pytest.raises(RuntimeError):
            with batcher.admit("a", 1):
                raise RuntimeError("the body never came")
    assert batcher.in_progress == 0
    with batcher.admit("a", 1) as slot:
        assert slot.submit(21).result(5) == 21


def test_concurrent_admissions_never_exceed_the_share(batcher):
    held, most, lock = [0], [0], threading.Lock()
    start = threading.Barrier(16)

    def attempt():
        start.wait()
        try:
            with batcher.admit("a", 3):
                with lock:
                    held[0] += 1
                    most[0] = max(most[0], held[0])
                threading.Event().wait(0.02)
                with lock:
                    held[0] -= 1
        except Busy:
            pass

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= most[0] <= 3 and batcher.in_progress == 0


@pytest.mark.parametrize(
    "host, key",
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same /64: one client
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client on a dual-stack socket
        ("testclient", "testclient"),
    ],
)
def test_client_key(host, key):
    assert client_key(SimpleNamespace(client=SimpleNamespace(host=host))) == key


def test_client_key_without_a_client():
    assert client_key(SimpleNamespace(client=None)) == "unknown"


@pytest.mark.parametrize(
    "location, expected",
    [
        (b"http://evil.example/layers/1", b"/layers/1"),
        (b"https://EVIL.example/layers/1?page=2", b"/layers/1?page=2"),
        (b"http://evil.example//other.example/x", b"/other.example/x"),
        (b"http://evil.example/\\other.example/x", b"/other.example/x"),
        (b"http://evil.example", b"/"),
        (b"http://127.0.0.1:8000/layers/1", b"/layers/1"),  # no Host header: the server's own address
        (b"https://elsewhere.example/x", b"https://elsewhere.example/x"),  # not this server: left alone
        (b"/layers/1", b"/layers/1"),
    ],
)
def test_redirects_back_to_this_server_become_relative(location, expected):
    assert relative_location(location, {"evil.example", "127.0.0.1:8000"}) == expected


@pytest.mark.parametrize("path", ["/layers/11/", "/api/layers/11/", "/search/"])
def test_trailing_slash_redirect_ignores_a_forged_host(client, path):
    response = client.get(path, headers={"Host": "evil.example"})
    assert response.status_code == 307, path
    assert response.headers["location"] == path.rstrip("/")
    assert response.headers["x-frame-options"] == "DENY"


def test_connection_cap_fits_the_open_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2000, hard), hard))
        assert connection_cap(None) == min(1000, min(2000, hard) - FD_RESERVE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (600, hard))
        assert connection_cap(1000) == 600 - FD_RESERVE
        assert connection_cap(100) == 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def upload(client, data: bytes, **fields):
    return client.post("/upload", files={"file": ("photo.jpg", data, "image/jpeg")}, data=fields)


def test_html_upload_redirect_keeps_the_chosen_layers_sort_and_top(live_client):
    data = cases.encode(cases.noisy((150, 110), seed=71), "JPEG")
    response = upload(live_client, data, layers="2", sort="cls", top="5")
    assert response.status_code == 303
    location = response.headers["location"]
    upload_id = re.fullmatch(r"/uploads/([0-9a-f]{32})\?layers=2&sort=cls&top=5", location).group(1)
    direct = live_client.post(
        "/api/encode",
        files={"file": ("photo.jpg", data, "image/jpeg")},
        data={"layers": "2", "sort": "cls", "top": "5"},
    ).json()
    page = live_client.get(location)
    assert page.status_code == 200 and '<b aria-current="true">CLS activation</b>' in page.text
    twin = live_client.get("/api" + location).json()  # what the page shows, as JSON
    assert direct["upload_id"] == upload_id == twin["upload_id"]
    assert twin["sort"] == "cls" and twin["top"] == 5 and list(twin["layers"]) == ["2"]
    assert [f["feature"] for f in twin["layers"]["2"]["features"]] == [
        f["feature"] for f in direct["layers"]["2"]["features"]
    ]
    defaults = upload(live_client, data, layers="1,2", top="16")  # every layer and the default top: implicit
    assert defaults.headers["location"] == f"/uploads/{upload_id}?sort=max"
