"""Serving at full scale: 8 layers x 65,536 features x 32 top images, ~50,000 thumbnails.

Generates a synthetic index of the real size with the project's own writer
(cached in bench/.cache/serve), starts a real uvicorn (`clipscope-explorer
serve`, 2 workers, one per core; BENCH_WORKERS to change), and drives it from a small keep-alive HTTP client:
1. one client, random feature pages, 30 s: p50 <= 15 ms, p99 <= 40 ms;
2. 16 concurrent clients, random feature pages, 30 s: >= 300 pages/s, p99 <= 150 ms;
3. 16 concurrent clients, random thumbnails, 15 s: >= 1,000 images/s.
The baseline measured in the same run is the server's floor: the static
favicon under the same clients (no index work). The last line sums up: PASS
only if every target passes.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
from _timing import REPO_ROOT, print_results, result_line

CACHE = REPO_ROOT / "bench" / ".cache" / "serve"
LAYERS = (2, 5, 8, 11, 14, 17, 20, 22)
N_FEATURES, TOP_N, N_IMAGES, N_TOKENS = 65_536, 32, 50_000, 257
N_SAMPLES = 1_000_000  # images encoded; N_IMAGES of them are shown (thumbnails)
SECONDS = float(os.environ.get("BENCH_SECONDS", 30))
WORKERS = int(os.environ.get("BENCH_WORKERS", 2))  # one per core


def thumbnails(count: int, rng) -> list[bytes]:
    """A pool of distinct-looking JPEGs (each image row gets one)."""
    from PIL import Image

    pool = []
    for _ in range(count):
        pixels = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((224, 224), Image.BICUBIC).save(buffer, "JPEG", quality=85)
        pool.append(buffer.getvalue())
    return pool


def build_index(path) -> None:
    from clipscope_explorer.precompute.accumulate import histogram_edges
    from clipscope_explorer.precompute.index.store import IndexWriter, blob_column

    rng = np.random.default_rng(0)
    edges = histogram_edges().numpy()
    with IndexWriter(path) as writer:
        for layer in LAYERS:
            frequency = 10 ** rng.uniform(-6, -1, N_FEATURES)
            writer.add_layer(
                {
                    "layer": layer,
                    "sae_file": f"{layer}_resid/1200013184.pt",
                    "checkpoint": 1200013184,
                    "d_in": 1024,
                    "n_features": N_FEATURES,
                    "k": 32,
                    "n_images": 1_000_000,
                    "n_tokens": 257_000_000,
                    "mse": 300.0,
                    "explained_variance": 0.7,
                    "mse_raw": 300.0,
                    "explained_variance_raw": 0.7,
                    "l0": 32.0,
                    "dead_fraction": 0.0,
                    "active_fraction": 0.1,
                    "nonpositive_kept_fraction": 0.001,
                    "mse_by_position": rng.uniform(200, 400, N_TOKENS).tolist(),
                    "histogram_edges": edges.tolist(),
                }
            )
            for start in range(0, N_FEATURES, 16_384):
                n = min(16_384, N_FEATURES - start)
                features = np.arange(start, start + n, dtype=np.int32)
                words = [["synthetic", f"w{f % 997}", f"t{f % 89}"] for f in features]
                writer.add_rows(
                    "features",
                    {
                        "layer": np.full(n, layer, np.int32),
                        "feature": features,
                        "n_fired_tokens": (frequency[features] * 257e6).astype(np.int64),
                        "n_fired_images": (frequency[features] * 1e6 * 3).astype(np.int64),
                        "n_fired_cls": (frequency[features] * 1e5).astype(np.int64),
                        "frequency": frequency[features],
                        "image_frequency": np.minimum(frequency[features] * 3, 1),
                        "cls_frequency": frequency[features] / 10,
                        "mean_activation": rng.uniform(1, 5, n),
                        "max_activation": rng.uniform(5, 50, n),
                        "histogram": rng.integers(0, 1000, (n, len(edges) - 1)).astype(np.int32),
                        "position_mean": rng.random((n, N_TOKENS), dtype=np.float32),
                        "label_terms": words,
                        "label": [" ".join(w) for w in words],
                        "similar_features": rng.integers(0, N_FEATURES, (n, 10)).astype(np.int32),
                        "similar_cosines": np.sort(rng.random((n, 10), dtype=np.float32))[:, ::-1].copy(),
                        "prototype": [None] * n,  # built without embeddings
                        "zero_shot_terms": [[]] * n,
                        "zero_shot_scores": [[]] * n,
                        "zero_shot_margins": [[]] * n,
                    },
                )
                rows = n * TOP_N
                activation = np.sort(rng.uniform(1, 50, (n, TOP_N)).astype(np.float32))[:, ::-1].reshape(-1)
                writer.add_rows(
                    "examples",
                    {
                        "layer": np.full(rows, layer, np.int32),
                        "feature": np.repeat(features, TOP_N),
                        "kind": ["top"] * rows,
                        "band": np.zeros(rows, np.int8),
                        "rank": np.tile(np.arange(1, TOP_N + 1, dtype=np.int32), n),
                        "image_id": rng.integers(0, N_IMAGES, rows).astype(np.int32),
                        "activation": activation,
                        "cls_activation": activation / 3,
                        "heatmap_scale": activation / 255,
                        "heatmap": blob_column(rng.integers(0, 256, (rows, N_TOKENS - 1), dtype=np.uint8)),
                    },
                )
            print(f"  layer {layer} written", flush=True)
        pool = thumbnails(500, rng)

        def metadata(start: int, stop: int) -> dict:
            ids = np.arange(start, stop, dtype=np.int32)
            return {
                "image_id": ids,
                "source": ["laion/00000.tar"] * len(ids),
                "key": [f"{i:09d}" for i in ids],
                "url": [f"https://example.org/{i}.jpg" for i in ids],
                "caption": [f"synthetic image {i}" for i in ids],
                "width": np.full(len(ids), 640, np.int32),
                "height": np.full(len(ids), 480, np.int32),
            }

        for start in range(0, N_IMAGES, 10_000):
            shown = metadata(start, min(start + 10_000, N_IMAGES))
            writer.add_rows("images", {**shown, "thumbnail": [pool[i % len(pool)] for i in shown["image_id"]]})
        for start in range(0, N_SAMPLES, 100_000):  # every encoded image, most not shown by any feature
            encoded = metadata(start, min(start + 100_000, N_SAMPLES))
            writer.add_rows("samples", {**encoded, "embedding": [None] * len(encoded["image_id"])})  # no embeddings
        writer.put_meta(
            model={"name": "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "pretrained": None},
            sae={"source": "lewington/CLIP-ViT-L-scope", "checkpoint": 1200013184},
            released_suite=False,
            layers=list(LAYERS),
            n_tokens=N_TOKENS,
            grid=[16, 16],
            d_model=1024,
            image_size=224,
            normalisation="none",
            sample={"sources": ["synthetic"], "n_images": N_SAMPLES, "n_skipped": 0, "skipped": []},
            top_n=TOP_N,
            band_count=4,
            band_size=4,
            active_threshold=0.01,
            timings={},
            versions={},
            demo=False,
            embeddings=None,
            zero_shot=None,
        )
        writer.finish()


class Client:
    """A minimal HTTP/1.1 keep-alive client (GET only), cheap enough not to dominate the CPU."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def get(self, path: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await self.reader.readexactly(length)
        return status


async def drive(port: int, paths, clients: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        client = Client(port)
        while time.perf_counter() < stop:
            start = time.perf_counter()
            status = await client.get(next(paths))
            latencies.append(time.perf_counter() - start)
            errors += status != 200

    await asyncio.gather(*(one() for _ in range(clients)))
    return latencies, errors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(port: int, process) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            output = process.stderr or process.stdout  # load.py sends stderr to stdout
            raise SystemExit(f"server exited: {output.read().decode()[-2000:] if output else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                if data.startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not start")


def main() -> None:
    index = CACHE / "full.duckdb"
    if not index.is_file():
        print(f"generating the full-scale index at {index} (once; minutes)")
        CACHE.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        build_index(index)
        print(f"  generated in {time.perf_counter() - start:.0f} s, {index.stat().st_size / 2**30:.1f} GiB")
    port = free_port()
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
            str(WORKERS),
            "--no-live",
            "--no-text",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_ready(port, server)
        rng = random.Random(0)

        def feature_pages():
            while True:
                yield f"/layers/{rng.choice(LAYERS)}/features/{rng.randrange(N_FEATURES)}"

        def thumbs():
            with __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{port}/api/layers/20/features/0") as r:
                thumb = json.loads(r.read())["top_images"][0]["thumbnail_url"]
            prefix = thumb.rsplit("/", 1)[0]
            while True:
                yield f"{prefix}/{rng.randrange(N_IMAGES)}.jpg"

        def static():
            while True:
                yield "/static/favicon.svg"

        asyncio.run(drive(port, feature_pages(), 4, 5))  # warm both workers' caches
        results = []
        floor, _ = asyncio.run(drive(port, static(), 1, 5))
        print(f"baseline (static file, 1 client): p50 {statistics.median(floor) * 1e3:.2f} ms")
        single, errors = asyncio.run(drive(port, feature_pages(), 1, SECONDS))
        p50, p99 = np.percentile(single, 50) * 1e3, np.percentile(single, 99) * 1e3
        print(f"1 client: {len(single)} feature pages, p50 {p50:.1f} ms, p99 {p99:.1f} ms, {errors} errors")
        results += [result_line("serve_page_p50_ms", p50, "<=", 15), result_line("serve_page_p99_ms", p99, "<=", 40)]
        many, errors = asyncio.run(drive(port, feature_pages(), 16, SECONDS))
        rate, p99 = len(many) / SECONDS, np.percentile(many, 99) * 1e3
        print(f"16 clients: {rate:.0f} feature pages/s, p99 {p99:.1f} ms, {errors} errors")
        results += [
            result_line("serve_pages_per_s", rate, ">=", 300, 1),
            result_line("serve_pages_p99_ms", p99, "<=", 150),
        ]
        images, errors = asyncio.run(drive(port, thumbs(), 16, SECONDS / 2))
        rate = len(images) / (SECONDS / 2)
        print(f"16 clients: {rate:.0f} thumbnails/s, {errors} errors")
        results.append(result_line("serve_thumbnails_per_s", rate, ">=", 1000, 1))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print_results("serve", results)


if __name__ == "__main__":
    main()
