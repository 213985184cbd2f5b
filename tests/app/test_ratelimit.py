"""The per-client upload rate limit: a token bucket per client address, 429 with Retry-After."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from clipscope_explorer.app.serving.ratelimit import RateLimiter, upload_limiter
from clipscope_explorer.app.settings import Settings
from tests import image_cases as cases
from tests.app.conftest import live_app_client, wait_live


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=3, clock=clock)  # one every 10 s
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("a") == 10
    assert limiter.acquire("b") == 0  # other clients are not affected
    clock.now += 4
    assert limiter.acquire("a") == 6
    clock.now += 6
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 10
    clock.now += 3600  # an idle client gets its burst back, never more
    assert [limiter.acquire("a") for _ in range(4)] == [0, 0, 0, 10]


def test_memory_is_bounded():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=2, max_clients=100, clock=clock)
    for n in range(1000):
        limiter.acquire(f"10.0.{n // 256}.{n % 256}")
        clock.now += 0.01
    assert len(limiter) <= 100
    assert limiter.acquire("10.0.3.231") == 0 and limiter.acquire("10.0.3.231") == 1  # recent ones are kept


def test_settings():
    assert upload_limiter(Settings(index="x.duckdb", upload_rate_limit=0)) is None
    limiter = upload_limiter(Settings(index="x.duckdb"))
    assert limiter.rate == 30 / 60 and limiter.burst == 10
    with pytest.raises(ValueError):
        Settings(index="x.duckdb", upload_rate_limit=-1)


@pytest.fixture(scope="module")
def limited(live_index, tmp_path_factory):
    with live_app_client(
        live_index, tmp_path_factory.mktemp("limited"), upload_rate_limit=2, upload_rate_burst=2
    ) as client:
        wait_live(client)
        yield client


def _post(client, seed: int, path: str = "/api/encode", data: bytes | None = None):
    image = data if data is not None else cases.encode(cases.noisy((48, 40), seed=seed), "JPEG")
    return client.post(path, files={"file": ("a.jpg", image, "image/jpeg")})


def test_over_the_limit_is_429_with_retry_after(limited):
    limited.app.state.upload_limiter = RateLimiter(2, 2)
    assert _post(limited, 1).status_code == 200 and _post(limited, 2).status_code == 200
    refused = _post(limited, 3)
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 30
    detail = refused.json()["detail"]
    assert "too many uploads" in detail and "\n" not in detail
    page = _post(limited, 4, path="/upload")
    assert page.status_code == 429 and "too many uploads" in page.text and page.headers["Retry-After"].isdigit()
    assert limited.get("/layers/1").status_code == 200  # browsing is never limited
    other = TestClient(limited.app, client=("203.0.113.9", 4000))  # another address: its own bucket
    assert _post(other, 5).status_code == 200


def test_the_limit_applies_before_the_body_is_read(limited):
    limited.app.state.upload_limiter = RateLimiter(1, 1)
    assert _post(limited, 6).status_code == 200
    too_large = b"\xff\xd8" + b"0" * (limited.app.state.settings.max_upload_bytes + 10)
    assert _post(limited, 0, data=too_large).status_code == 429  # not 413: the body was never read


def test_tokens_come_back(limited):
    clock = Clock()
    limited.app.state.upload_limiter = RateLimiter(60, 1, clock=clock)
    assert _post(limited, 7).status_code == 200
    assert _post(limited, 8).status_code == 429
    clock.now += 1.01
    assert _post(limited, 9).status_code == 200
