"""Interventions: an edit's latency against a plain upload's, and what keeping the decoders costs a worker.

ViT-L-14 architecture with random weights and the released suite's shape: full-size SAEs (1024 x 65,536,
k 32, random, one released-format .pt file per layer, written once to bench/.cache/intervene) on the
8 released layers, loaded by the live encoder's own code (encoders in the live precision; decoders
memory-mapped from the files, `DecoderRows`). The server runs in its own process (uvicorn, the app
of `create_app` with that encoder injected, uploads stored) over bench/live.py's index.
1. latency: in each round a new image is uploaded (`POST /api/encode`, every layer) and then edited
   (`POST /api/intervene` with its upload_id: the strongest feature at the edited layer, scale 0),
   the edited layer cycling through 2, 11 and 20; the paired ratio intervention / upload per round.
   Target: the median ratio of the worst edited layer <= 1.3 (an edit runs the tower once more from
   the image, with the SAEs of its layer and the later ones; the unedited side is the stored upload).
2. memory: the server's RSS (VmRSS) after loading and after the uploads and edits of part 1, and the
   same server with interventions off (no decoders) after as many uploads; target: keeping the 8
   decoders (8 x 256 MiB in float32 if they were read) grows a worker by <= 256 MiB.

Run from the repo root: python bench/intervene.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from _timing import REPO_ROOT, print_results, result_line
from live import CACHE as LIVE_CACHE
from live import build_index, free_port, live_precision, photos, wait_ready

CACHE = REPO_ROOT / "bench" / ".cache" / "intervene"
LAYERS, EDITED = (2, 5, 8, 11, 14, 17, 20, 22), (2, 11, 20)
N_FEATURES, K, TOKENS = 65_536, 32, 1_200_013_184
ROUNDS = 6  # per edited layer
MIB = 2**20


def sae_file(layer: int) -> Path:
    return CACHE / "sae" / f"{layer}_resid" / f"{TOKENS}.pt"


def write_saes() -> None:
    """One random SAE per layer in the released layout (about 537 MB each), written once."""
    import torch

    from clipscope_explorer.precompute.model.checkpoints import save_checkpoint

    for layer in LAYERS:
        if sae_file(layer).is_file():
            continue
        generator = torch.Generator().manual_seed(layer)
        enc = torch.randn(1024, N_FEATURES, generator=generator) / 32
        dec = torch.randn(N_FEATURES, 1024, generator=generator) / 32
        save_checkpoint(sae_file(layer), 0.1 * torch.randn(1024, generator=generator), enc, dec, K, TOKENS)


def serve(port: int, index: Path, store: Path, interventions: bool) -> None:
    """The server process: ViT-L-14 (random) and the 8 SAEs from their files, as `load_encoder` loads them."""
    import torch
    import uvicorn

    from clipscope_explorer.app.live.encoder import LiveEncoder
    from clipscope_explorer.app.live.spec import LiveSpec
    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings
    from clipscope_explorer.precompute.model.checkpoints import DecoderRows, load_checkpoint_file
    from clipscope_explorer.precompute.model.vision import load_tower, resolve_device

    device = resolve_device("auto")
    precision = live_precision(device)
    torch.manual_seed(0)
    tower = load_tower("ViT-L-14", device=device, random_weights=True, weights_precision=precision)
    saes = {
        layer: load_checkpoint_file(
            sae_file(layer), layer=layer, purpose="encode", weights_precision=precision, device=device
        )
        for layer in LAYERS
    }
    decoders = {layer: DecoderRows(sae_file(layer)) for layer in LAYERS} if interventions else {}
    spec = LiveSpec(model="ViT-L-14 (random weights)", pretrained=None, sae="random", layers=LAYERS, index_layers=(20,))
    settings = Settings(index=index, upload_store=store, upload_rate_limit=0, upload_slots_per_client=0)
    encoder = LiveEncoder(tower, saes, spec, 8, 16, precision, decoders)
    uvicorn.run(create_app(settings, live_encoder=encoder), host="127.0.0.1", port=port, log_level="warning")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def start(index: Path, store: Path, interventions: bool):
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    port = free_port()
    command = [sys.executable, __file__, "--serve", str(port), str(index), str(store), str(int(interventions))]
    server = subprocess.Popen(command, cwd=REPO_ROOT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, server)
    return server, base


def timed_post(client, path: str, **kwargs) -> tuple[float, dict]:
    started = time.perf_counter()
    response = client.post(path, **kwargs)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"{path} answered {response.status_code}: {response.text[:200]}")
    return elapsed, response.json()


def main() -> None:
    import httpx
    import torch

    index = LIVE_CACHE / "index.duckdb"
    if not index.is_file():
        LIVE_CACHE.mkdir(parents=True, exist_ok=True)
        build_index(index)
    write_saes()
    on_gpu = torch.cuda.is_available()
    precision = live_precision(torch.device("cuda" if on_gpu else "cpu"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'cuda' if on_gpu else 'cpu'}, {precision}; "
        f"ViT-L-14 (random) + 8 SAEs 1024 x {N_FEATURES}, k {K}, layers {', '.join(map(str, LAYERS))}"
    )
    images = photos(ROUNDS * len(EDITED) + 2, seed=7)
    results = []

    server, base = start(index, CACHE / "uploads", interventions=True)
    try:
        loaded = rss(server.pid)
        with httpx.Client(base_url=base, timeout=600) as client:
            timed_post(client, "/api/encode", files={"file": ("w.jpg", images[-1], "image/jpeg")})  # warm-up
            ratios: dict[int, list[float]] = {layer: [] for layer in EDITED}
            seconds: dict[str, list[float]] = {"upload": [], "intervention": []}
            for n, data in enumerate(images[: ROUNDS * len(EDITED)]):
                layer = EDITED[n % len(EDITED)]
                upload_s, uploaded = timed_post(client, "/api/encode", files={"file": ("x.jpg", data, "image/jpeg")})
                strongest = uploaded["layers"][str(layer)]["features"][0]["feature"]
                form = {"upload_id": uploaded["upload_id"], "layer": str(layer), "feature": str(strongest)}
                edit_s, edited = timed_post(client, "/api/intervene", data={**form, "scale": "0"})
                assert edited["edited"]["tokens_changed"] > 0
                ratios[layer].append(edit_s / upload_s)
                seconds["upload"].append(upload_s)
                seconds["intervention"].append(edit_s)
        used = rss(server.pid)
        print(
            f"1. upload p50 {statistics.median(seconds['upload']) * 1e3:.0f} ms, "
            f"intervention p50 {statistics.median(seconds['intervention']) * 1e3:.0f} ms"
        )
        for layer, values in ratios.items():
            print(f"  edit at layer {layer}: median ratio {statistics.median(values):.3f} over {len(values)} rounds")
        worst = max(statistics.median(values) for values in ratios.values())
        results.append(result_line("intervention_latency_ratio", worst, "<=", 1.3))
    finally:
        server.terminate()
        server.wait(timeout=60)

    server, base = start(index, CACHE / "uploads-lean", interventions=False)
    try:
        lean_loaded = rss(server.pid)
        with httpx.Client(base_url=base, timeout=600) as client:
            for data in images[: ROUNDS * len(EDITED)]:
                timed_post(client, "/api/encode", files={"file": ("x.jpg", data, "image/jpeg")})
        lean_used = rss(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(
        f"2. worker RSS, interventions on: {loaded / MIB:.0f} MiB loaded, {used / MIB:.0f} MiB after "
        f"{len(images) - 1} uploads and {ROUNDS * len(EDITED)} edits; off (--no-interventions): "
        f"{lean_loaded / MIB:.0f} MiB loaded, {lean_used / MIB:.0f} MiB after as many uploads"
    )
    results.append(result_line("intervention_worker_memory_growth_mib", (used - lean_used) / MIB, "<=", 256, 0))
    print_results("intervene", results)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1")
    else:
        main()
