"""Memory per server worker: the RSS of one worker process after browsing and uploads.

1. the demo index (bench/.cache/load/demo, built by bench/load.py), `serve --no-live --no-text` (the baseline);
2. the same with live encoding of the demo's tiny model;
3. ViT-L-14 (random weights, the released architecture) and one full-size SAE (1024 x 65,536, k 32)
   over the 65,536-feature index of bench/live.py, served by its `--serve` mode (uvicorn, the app).
Each worker gets 5 s of feature pages and thumbnails and 12 uploads of distinct images; its VmRSS
and VmHWM (peak) are read from /proc. Printed beside the estimate from parameter counts: ViT-L-14's
vision tower has 303,966,208 parameters (1.13 GiB in fp32, half in bf16), the SAE encoder 67,108,864
(live encoding keeps no decoder), and the chunked encode holds 1,024 tokens x 65,536 floats (0.25 GiB).
Target: case 3 <= 3.0 GiB, so two such workers fit a machine with 8 GB.

Run from the repo root: python bench/worker_memory.py
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time

import httpx
import torch
from _timing import REPO_ROOT, result_line
from live import live_precision
from load import CACHE, photos
from serve import free_port, wait_ready

GIB = 2**30
VIT_L_VISION, SAE_ENCODER_PARAMS, CHUNK_BYTES = 303_966_208, 1024 * 65_536, 1024 * 65_536 * 4


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as status:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status if line.startswith("Vm")}
    return fields["VmRSS"], fields["VmHWM"]


def exercise(port: int, uploads: bool) -> None:
    """5 s of feature pages and thumbnails, then 12 uploads (when live encoding is on)."""
    rng = random.Random(0)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        if uploads:
            deadline = time.time() + 600
            while client.get("/api/upload").json()["live"]["state"] == "loading" and time.time() < deadline:
                time.sleep(0.5)
        index = client.get("/api").json()["index"]
        layers = index["layers"]
        n_features = {n: client.get(f"/api/layers/{n}").json()["n_features"] for n in layers}
        end = time.perf_counter() + 5
        while time.perf_counter() < end:
            layer = rng.choice(layers)
            page = client.get(f"/api/layers/{layer}/features/{rng.randrange(n_features[layer])}").json()
            for image in page["top_images"][:4]:
                client.get(image["thumbnail_url"])
        for image in photos(12) if uploads else []:
            response = client.post("/api/encode", files={"file": ("p.jpg", image, "image/jpeg")})
            if response.status_code != 200:
                raise SystemExit(f"upload failed: {response.status_code} {response.text[:300]}")


def measure(name: str, command: list[str], port: int, uploads: bool) -> int:
    env = {**os.environ, "CLIPSCOPE_UPLOAD_RATE_LIMIT": "0"}  # one client uploads back to back
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(port, server)
        exercise(port, uploads)
        rss, peak = memory(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"{name}: RSS {rss / 2**20:.0f} MiB (peak {peak / 2**20:.0f} MiB)")
    return rss


def main() -> None:
    from clipscope_explorer.precompute.demo.build import build_demo

    demo = build_demo(CACHE / "demo", 2000, progress=False)
    with tempfile.TemporaryDirectory(dir=CACHE) as store:
        serve = [sys.executable, "-m", "clipscope_explorer.cli", "serve", str(demo), "--upload-store", store, "--port"]
        port = free_port()
        bare = measure(
            "demo index, --no-live --no-text (baseline)", [*serve, str(port), "--no-live", "--no-text"], port, False
        )
        port = free_port()
        tiny = measure("demo index, live encoding (tiny demo model)", [*serve, str(port)], port, True)
        live_index = REPO_ROOT / "bench" / ".cache" / "live" / "index.duckdb"
        if not live_index.is_file():
            from live import build_index

            live_index.parent.mkdir(parents=True, exist_ok=True)
            build_index(live_index)
        port = free_port()
        command = [sys.executable, str(REPO_ROOT / "bench" / "live.py"), "--serve", str(port), str(live_index), store]
        large = measure("65,536-feature index, live ViT-L-14 + one 65,536-feature SAE", command, port, True)
    precision = live_precision(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    weights = (VIT_L_VISION + SAE_ENCODER_PARAMS) * (2 if precision == "bf16" else 4)  # no decoder is kept
    print(
        f"estimate for ViT-L-14 + one SAE encoder in {precision}: weights {weights / GIB:.2f} GiB + encode chunk "
        f"{CHUNK_BYTES / GIB:.2f} GiB "
        f"+ a worker without live encoding ({bare / GIB:.2f} GiB here) "
        f"= {(weights + CHUNK_BYTES + bare) / GIB:.2f} GiB; "
        f"measured {large / GIB:.2f} GiB; the tiny model adds {(tiny - bare) / 2**20:.0f} MiB"
    )
    line, ok = result_line("worker_rss_vitl_gib", large / GIB, "<=", 3.0, 2)
    print(line)


if __name__ == "__main__":
    main()
