"""Load: 32 concurrent clients for 60 s against a real `clipscope-explorer serve --workers 2`.

The demo-size index (`clipscope_explorer.precompute.demo.build.build_demo`, 2,000 images, built once and
cached in bench/.cache/load/demo) is served with live encoding on (the demo's own
model and SAEs) and a fresh upload store. Each client keeps one connection alive
and sends, back to back, a mix of feature pages (HTML and JSON), layer tables,
search, thumbnails and overlays, and a few % uploads of distinct images. Each
client sends its own `X-Forwarded-For` (as a proxy in front would; uvicorn trusts
it from 127.0.0.1), so the per-client upload rate limit applies per client.
Targets:
1. zero 5xx answers (a deliberate 503 for an upload when the encoder is busy,
   and 429 rate limiting, are counted and printed apart) and zero connection errors;
2. p99 latency of pages (HTML and JSON, uploads and images apart) <= 500 ms;
3. RSS of the server (all its processes, from /proc) grows <= 10 % from the 10th
   to the last second.
The baseline, measured in the same run before the load: one client fetching the
static favicon (the server's floor) and one client fetching feature pages.
The last line sums up: PASS only if every target passes.

Run from the repo root: python bench/load.py   (BENCH_SECONDS, BENCH_CLIENTS override)
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

import numpy as np
from _procs import describe_processes, machine_busy, rss_and_cpu, server_tree
from _timing import REPO_ROOT, print_results, result_line
from serve import free_port, wait_ready

CACHE = REPO_ROOT / "bench" / ".cache" / "load"
SECONDS = float(os.environ.get("BENCH_SECONDS", 60))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", 32))
MIX = [
    ("feature_page", 30),
    ("feature_json", 12),
    ("layer_page", 8),
    ("layer_json", 4),
    ("search", 6),
    ("search_json", 3),
    ("thumbnail", 22),
    ("overlay", 12),
    ("upload", 3),
]
PAGES = {"feature_page", "feature_json", "layer_page", "layer_json", "search", "search_json"}


class Connection:
    """One keep-alive HTTP/1.1 connection (GET and POST), cheap enough not to dominate the CPU."""

    def __init__(self, port: int, forwarded_for: str):
        self.port, self.extra = port, f"X-Forwarded-For: {forwarded_for}\r\n".encode()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n".encode() + self.extra
        if body:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode()
        self.writer.write(head + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw.split(b" ", 2)[1])
        length = re.search(rb"(?im)^content-length: *(\d+)", raw)
        if length is None:
            raise ConnectionError(f"no Content-Length in {raw[:200]!r}")
        await self.reader.readexactly(int(length.group(1)))
        if re.search(rb"(?im)^connection: *close", raw):
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def photos(count: int) -> list[bytes]:
    """Distinct 320 x 240 JPEGs, so uploads are encoded, not answered from the store."""
    from PIL import Image

    rng, out = np.random.default_rng(5), []
    for _ in range(count):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = "clipscope-load-bench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


class Workload:
    """Random requests drawn from MIX over what the index holds (read through the JSON API)."""

    def __init__(self, port: int, seed: int):
        import urllib.request

        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as response:
                return json.loads(response.read())

        overview = get("/api")
        self.index_id, self.layers = overview["index"]["index_id"], overview["index"]["layers"]
        self.features = {layer: get(f"/api/layers/{layer}")["n_features"] for layer in self.layers}
        self.examples, words = [], Counter()
        for layer in self.layers:
            for page in range(1, self.features[layer] // 200 + 2):
                for row in get(f"/api/layers/{layer}?page_size=200&page={page}")["features"]:
                    words.update(row["label_terms"])
                    if row["image_id"] is not None:
                        self.examples.append((layer, row["feature"], row["image_id"]))
        self.words = [w for w, _ in words.most_common(40)] + ["zebra", "nothing here", "20/7", "1/3"]
        self.photos = [multipart(p) for p in photos(400)]
        self.rng = random.Random(seed)
        self.kinds = [kind for kind, weight in MIX for _ in range(weight)]

    def next(self) -> tuple[str, str, str, bytes, str]:
        """(kind, method, path, body, content type)."""
        rng, kind = self.rng, self.rng.choice(self.kinds)
        layer = rng.choice(self.layers)
        feature = rng.randrange(self.features[layer])
        ex_layer, ex_feature, image = rng.choice(self.examples)
        paths = {
            "feature_page": f"/layers/{layer}/features/{feature}",
            "feature_json": f"/api/layers/{layer}/features/{feature}",
            "layer_page": f"/layers/{layer}?sort={rng.choice(['frequency', 'max_activation', 'feature'])}"
            f"&order=desc&page={rng.randrange(1, 4)}",
            "layer_json": f"/api/layers/{layer}?min_freq=0&page={rng.randrange(1, 4)}",
            "search": f"/search?q={rng.choice(self.words).replace(' ', '+')}",
            "search_json": f"/api/search?q={rng.choice(self.words).replace(' ', '+')}",
            "thumbnail": f"/images/{self.index_id}/{image}.jpg",
            "overlay": f"/images/{self.index_id}/layers/{ex_layer}/features/{ex_feature}/{image}.png",
        }
        if kind == "upload":
            body, content_type = self.photos[rng.randrange(len(self.photos))]
            return kind, "POST", "/api/encode", body, content_type
        return kind, "GET", paths[kind], b"", ""


class Stats:
    def __init__(self):
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.connection_errors: list[str] = []


async def drive(port: int, workload: Workload, clients: int, seconds: float, kinds=None) -> Stats:
    stats, stop = Stats(), time.perf_counter() + seconds

    async def client(number: int) -> None:
        connection = Connection(port, f"10.7.{number // 250}.{number % 250 + 1}")
        while time.perf_counter() < stop:
            kind, method, path, body, content_type = workload.next()
            if kinds and kind not in kinds:
                continue
            start = time.perf_counter()
            try:
                status = await asyncio.wait_for(connection.request(method, path, body, content_type), 30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ConnectionError, ValueError) as error:
                stats.connection_errors.append(f"{kind} {path}: {error!r}")
                connection.close()
                continue
            stats.latency[kind].append(time.perf_counter() - start)
            stats.status[kind][status] += 1
        connection.close()

    await asyncio.gather(*(client(n) for n in range(clients)))
    return stats


def sample_rss(root: int, samples: list, midway: list, stop: threading.Event) -> None:
    """Every second: (seconds, summed RSS, summed CPU) of the server's processes; halfway, one line each."""
    start = time.perf_counter()
    while not stop.is_set():
        samples.append((time.perf_counter() - start, *rss_and_cpu(server_tree(root))))
        if not midway and samples[-1][0] >= SECONDS / 2:
            midway += describe_processes(root)
        stop.wait(1.0)


def wait_live(port: int, process) -> None:
    """Until 20 answers in a row (new connections, so both workers answer) say live encoding is ready."""
    import urllib.request

    deadline, streak = time.time() + 300, 0
    while streak < 20:
        if process.poll() is not None or time.time() > deadline:
            raise SystemExit("live encoding did not become ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/upload") as response:
            state = json.loads(response.read())["live"]["state"]
        streak = streak + 1 if state == "ready" else 0
        time.sleep(0.05 if state == "ready" else 0.5)


def percentiles_ms(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p99 = np.percentile(values, [50, 99]) * 1e3
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"


def main() -> None:
    from clipscope_explorer.precompute.demo.build import build_demo

    started = time.perf_counter()
    index = build_demo(CACHE / "demo", 2000, progress=False)
    print(f"demo index: {index} ({index.stat().st_size / 1e6:.1f} MB, ready in {time.perf_counter() - started:.0f} s)")
    store = tempfile.mkdtemp(prefix="store-", dir=CACHE)
    port = free_port()
    log = open(CACHE / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clipscope_explorer.cli",
            "serve",
            str(index),
            "--port",
            str(port),
            "--workers",
            "2",
            "--upload-store",
            store,
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(port, server)
        wait_live(port, server)
        workload = Workload(port, seed=0)
        baseline = asyncio.run(drive_static(port, 5))
        idle = asyncio.run(drive(port, workload, 1, 5, kinds={"feature_page"}))
        print(
            f"baseline, 1 client: static favicon {percentiles_ms(baseline)}; "
            f"feature pages {percentiles_ms(idle.latency['feature_page'])}"
        )
        samples, midway = [], []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(server.pid, samples, midway, stop), daemon=True)
        busy0, own0 = machine_busy(), sum(os.times()[:2])
        sampler.start()
        stats = asyncio.run(drive(port, workload, CLIENTS, SECONDS))
        stop.set()
        sampler.join()
        busy1, own1 = machine_busy(), sum(os.times()[:2])
        print(f"halfway through: {'; '.join(midway)}")
        print(f"at the end: {'; '.join(describe_processes(server.pid))}")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(store, ignore_errors=True)
    report(stats, samples, (busy1 - busy0, own1 - own0))


async def drive_static(port: int, seconds: float) -> list[float]:
    connection, latencies, stop = Connection(port, "10.8.0.1"), [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        await connection.request("GET", "/static/favicon.svg")
        latencies.append(time.perf_counter() - start)
    connection.close()
    return latencies


def report(stats: Stats, samples: list, cpu: tuple[float, float]) -> None:
    total = sum(sum(c.values()) for c in stats.status.values())
    print(f"{CLIENTS} clients, {SECONDS:.0f} s: {total} answers ({total / SECONDS:.0f}/s)")
    for kind, _ in MIX:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(stats.status[kind].items()))
        print(f"  {kind:13s} {percentiles_ms(stats.latency[kind]):32s} {statuses}")
    uploads = stats.status["upload"]
    server_errors = sum(
        n for kind, c in stats.status.items() for s, n in c.items() if s >= 500 and not (kind == "upload" and s == 503)
    )
    print(
        f"uploads: {uploads.get(200, 0)} encoded, {uploads.get(503, 0)} busy (503, deliberate backpressure), "
        f"{uploads.get(429, 0)} rate-limited (429)"
    )
    print(f"5xx other than upload backpressure: {server_errors}; connection errors: {len(stats.connection_errors)}")
    for line in stats.connection_errors[:5]:
        print(f"  {line}")
    unexpected = sum(
        n
        for kind, c in stats.status.items()
        for s, n in c.items()
        if 400 <= s < 500 and not (kind == "upload" and s == 429)
    )
    print(f"other 4xx (would be a bench bug): {unexpected}")
    pages = [t for kind in PAGES for t in stats.latency[kind]]
    p99 = float(np.percentile(pages, 99) * 1e3)
    print(f"pages (HTML and JSON): {len(pages)}, {percentiles_ms(pages)}")
    at10 = min(samples, key=lambda s: abs(s[0] - 10))
    last = samples[-1]
    growth = (last[1] - at10[1]) / at10[1] * 100
    print(
        f"server RSS (all processes): {at10[1] / 2**20:.0f} MiB at {at10[0]:.0f} s, {last[1] / 2**20:.0f} MiB "
        f"at {last[0]:.0f} s ({growth:+.1f} %); first sample {samples[0][1] / 2**20:.0f} MiB"
    )
    server_cpu = samples[-1][2] - samples[0][2]
    busy, own = cpu
    others = max(0.0, busy - own - server_cpu) / SECONDS
    print(
        f"CPU: server {server_cpu / SECONDS:.2f} cores, this client {own / SECONDS:.2f} cores, other processes "
        f"{others:.2f} cores of {os.cpu_count()}{'  WARNING: machine was shared' if others > 0.1 else ''}"
    )
    results = [
        result_line("load_5xx", server_errors, "<=", 0, 0),
        result_line("load_connection_errors", len(stats.connection_errors), "<=", 0, 0),
        result_line("load_page_p99_ms", p99, "<=", 500, 1),
        result_line("load_rss_growth_pct", growth, "<=", 10, 1),
    ]
    print_results("load", results)


if __name__ == "__main__":
    main()
