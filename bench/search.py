"""Search by meaning at full scale: 8 layers x 65,536 feature prototypes and 1,000,000 image embeddings
(768 dimensions, float16, as ViT-L/14's), with the ViT-L-14 text tower (random weights) on the CPU.

The synthetic index is written by the project's writer (cached in bench/.cache/search): unit vectors in
clusters around a shared direction, as CLIP embeddings cluster by content. As `serve` runs it: one text-tower
process (app/meaning/tower_process.py) loads ViT-L-14 (random weights, saved in the hub layout and loaded
through `local-dir:`, bf16) and embeds the queries of a worker process, the app of `create_app` (`--no-live`)
served through an in-process client:
1. features by meaning, a new query each time (text tower + a scan of every prototype): p50 <= 300 ms;
2. the same queries again (cached): p50 <= 20 ms;
3. images by meaning, new queries (text tower + a scan of every image embedding): p50 <= 300 ms;
4. the worker's memory growth for search by meaning: RssAnon (its own, unshared memory) after every
   query, less what the same app over this index takes without it (a `--no-text` worker, the baseline, in
   the same run): <= 600 MB. The text tower's process, one per server whatever the number of workers, is
   printed beside. The vectors are memory-mapped from the search cache: shared page cache (their resident
   size printed);
5. the effect of storing float16 rather than float32 on rankings: mean top-10 overlap of the exact
   rankings over the float32 vectors and over their float16 copies, for images and for features (>= 0.9).
Printed beside, in the same run: the bare text tower, the bare scans, the first start's export of the
vectors (once per index), and the scan alternatives (numpy and torch, float16/bfloat16/float32) that
chose torch's float16 product for the first pass.
The last line sums up: PASS only if every target passes.

BENCH_SEARCH_IMAGES, BENCH_SEARCH_FEATURES (per layer), BENCH_SEARCH_LAYERS, BENCH_SEARCH_QUERIES shrink it
for development. Run from the repo root: python bench/search.py
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _procs import child_figures
from _timing import REPO_ROOT, print_results, result_line

N_IMAGES = int(os.environ.get("BENCH_SEARCH_IMAGES", 1_000_000))
N_FEATURES = int(os.environ.get("BENCH_SEARCH_FEATURES", 65_536))
N_LAYERS = int(os.environ.get("BENCH_SEARCH_LAYERS", 8))
N_QUERIES = int(os.environ.get("BENCH_SEARCH_QUERIES", 20))
DIM, CLUSTERS, CHUNK = 768, 4096, 50_000
LAYERS = (2, 5, 8, 11, 14, 17, 20, 22)[:N_LAYERS]
CACHE = REPO_ROOT / "bench" / ".cache" / "search"
INDEX = CACHE / f"index-{N_IMAGES}-{N_LAYERS}x{N_FEATURES}.duckdb"
MB = 2**20
WORDS = (
    ["red", "small", "old", "shiny", "wet", "striped", "wooden", "blue", "tiny", "broken"],
    ["dog", "car", "bicycle", "teapot", "mountain", "crowd", "boat", "clock", "tree", "guitar"],
    ["at night", "on a beach", "in the snow", "on a table", "in a city", "under water", "in a field"],
)


# ---------------------------------------------------------------- synthetic vectors


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _directions(seed: int, n: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32))


COMMON, TEXT_COMMON = _directions(1, 2)
CENTRES = _directions(2, CLUSTERS)


def clustered(seed: list[int], n: int, spread: float) -> np.ndarray:
    """n unit vectors [n, DIM] float32: a shared direction, one cluster centre each, and noise."""
    rng = np.random.default_rng(seed)
    noise = _unit(rng.standard_normal((n, DIM), dtype=np.float32))
    return _unit(0.6 * COMMON + 0.8 * CENTRES[rng.integers(0, CLUSTERS, n)] + spread * noise).astype(np.float32)


def image_vectors(start: int, stop: int) -> np.ndarray:
    """Images [start, stop) (float32 originals; the index holds their float16 copies)."""
    return clustered([10, start], stop - start, 0.6)


def prototype_vectors(layer: int) -> np.ndarray:
    return clustered([20, layer], N_FEATURES, 0.4)


def text_like(n: int) -> np.ndarray:
    """Query vectors in a text cone of their own near cluster centres (CLIP's modality gap)."""
    rng = np.random.default_rng(30)
    noise = _unit(rng.standard_normal((n, DIM), dtype=np.float32))
    return _unit(0.6 * TEXT_COMMON + 0.6 * CENTRES[rng.integers(0, CLUSTERS, n)] + 0.5 * noise).astype(np.float32)


# ---------------------------------------------------------------- the index


def build_index(path: Path) -> None:
    """Layers of N_FEATURES features (one token position besides CLS, no examples) with prototypes, and
    N_IMAGES sample images with embeddings, written by the project's writer."""
    from clipscope_explorer.precompute.index.rows import LayerTotals, feature_columns, layer_row
    from clipscope_explorer.precompute.index.store import IndexWriter, vector_column

    rng = np.random.default_rng(0)
    fired = rng.integers(1, 1000, N_FEATURES)
    totals = LayerTotals(
        n_images=N_IMAGES,
        n_tokens=2 * N_IMAGES,
        fired=int(fired.sum()),
        nonpositive_kept=0,
        sq_error_by_position=np.array([1.0, 1.0]) * N_IMAGES,
        explained_variance=0.7 * 2 * N_IMAGES,
        fire_tokens=fired,
        fire_images=fired,
        fire_cls=fired // 2,
        activation_sum=fired * 2.0,
        max_activation=np.full(N_FEATURES, 5.0),
        position_sum=np.zeros((N_FEATURES, 2)),
        histogram=fired[:, None],
        edges=np.array([0.01, 100.0]),
    )
    labels = [[f"term{f % 997}"] for f in range(N_FEATURES)]
    neighbours = np.zeros((N_FEATURES, 1))
    with IndexWriter(path) as writer:
        for layer in LAYERS:
            writer.add_layer(layer_row(layer, totals, d_in=1024, k=32, sae_file=None, checkpoint=None))
            columns = feature_columns(
                layer, totals, labels, neighbours, neighbours, prototypes=prototype_vectors(layer)
            )
            writer.add_rows("features", columns)
        for start in range(0, N_IMAGES, CHUNK):
            stop = min(start + CHUNK, N_IMAGES)
            ids = np.arange(start, stop, dtype=np.int32)
            writer.add_rows(
                "samples",
                {
                    "image_id": ids,
                    "source": ["synthetic"] * len(ids),
                    "key": [f"{i:09d}" for i in ids],
                    "url": [None] * len(ids),
                    "caption": [f"synthetic image {i}" for i in ids],
                    "width": np.full(len(ids), 224, dtype=np.int32),
                    "height": np.full(len(ids), 224, dtype=np.int32),
                    "embedding": vector_column(image_vectors(start, stop)),
                },
            )
        writer.put_meta(
            model={"name": "ViT-L-14", "pretrained": None},
            sae={"source": "synthetic", "checkpoint": None},
            released_suite=False,
            layers=list(LAYERS),
            n_tokens=2,
            grid=[1, 1],
            d_model=1024,
            image_size=224,
            normalisation="none",
            precision="bf16",  # as the precompute job records on CUDA
            sample={"sources": ["synthetic"], "n_images": N_IMAGES, "n_skipped": 0, "skipped": []},
            top_n=0,
            band_count=0,
            band_size=0,
            active_threshold=0.01,
            timings={},
            demo=False,
            embeddings={"dim": DIM, "dtype": "float16"},
            zero_shot=None,
        )
        writer.finish()


# ---------------------------------------------------------------- one worker (a process of its own)


def memory() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in status
            if line.startswith(("RssAnon", "RssFile", "VmHWM"))
        }


def mapped_resident(folder: Path) -> int:
    """Bytes of the files under `folder` that this process maps and has resident (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(str(folder))
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def prompts(kind: str, n: int) -> list[str]:
    rng = np.random.default_rng({"features": 1, "images": 2}[kind])
    return [" ".join(words[rng.integers(len(words))] for words in WORDS) + f" {kind[0]}{i}" for i in range(n)]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def worker(mode: str, cache: str) -> None:
    """Serve the index in this process as a `serve` worker does; print one JSON line of measurements. mode:
    `text` (the shared text-tower process's address in the environment) or `baseline` (`--no-text`). Memory
    is read after the imports, once the app is ready, and after every query."""
    import gc

    from fastapi.testclient import TestClient

    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    out: dict = {"mode": mode, "memory_imports": memory()}
    settings = Settings(index=INDEX, live=False, text=mode == "text", search_cache=Path(cache))
    started = time.perf_counter()
    with TestClient(create_app(settings)) as client:
        service = client.app.state.meaning
        assert service.wait(3600), "the vectors did not load"
        assert mode != "text" or service.text_state == "ready", service.text_message
        tower = service.tower
        out["ready_s"] = time.perf_counter() - started
        out["vectors"] = {kind: service.vector_state[kind] for kind in service.vectors}
        for layer in LAYERS:  # the page caches every worker fills at start
            client.app.state.index.summaries(layer, [])
        client.get("/api/search", params={"q": "term1 term2", "by": "words"})
        gc.collect()
        out["memory_ready"] = memory()
        if mode == "text":
            out["precision"], out["scorer"] = tower.precision, type(service.scorer).__name__
            features, images = prompts("features", N_QUERIES), prompts("images", N_QUERIES)
            client.get("/api/search", params={"q": "warm up", "by": "meaning"})
            client.get("/api/search/images", params={"q": "warm up too"})

            def get(path: str, q: str) -> float:
                return timed(lambda: client.get(path, params={"q": q}).raise_for_status())

            out["features_s"] = [get("/api/search?by=meaning", q) for q in features]
            out["cached_s"] = [get("/api/search?by=meaning", q) for q in features]
            out["images_s"] = [get("/api/search/images", q) for q in images]
            gc.collect()
            out["memory_end"] = memory()
            out["mapped_vectors"] = mapped_resident(Path(cache))
            bare = prompts("images", 2 * N_QUERIES)[N_QUERIES:]
            out["tower_s"] = [timed(lambda q=q: tower.encode([f"a photo of {q}"])) for q in bare]
            vector = tower.encode(["a photo of a dog"]).vectors[0]
            limit = service.limit
            scan = {kind: service.vectors[kind] for kind in ("features", "images")}
            for kind, vectors in scan.items():
                vectors.top(vector, limit, service.scorer)  # pages in, as the requests before did
                out[f"scan_{kind}_s"] = [
                    timed(lambda v=vectors: v.top(vector, limit, service.scorer)) for _ in range(5)
                ]
            coarse, bound = service.scorer.coarse(scan["images"].matrix, vector, 0, len(scan["images"]))
            kth = np.partition(coarse, len(coarse) - limit)[len(coarse) - limit]
            out["candidates"] = int((coarse >= kth - 2 * bound * 1.01).sum())
        else:
            out["memory_end"] = out["memory_ready"]
    print("RESULT-JSON " + json.dumps(out))


def text_tower_process():
    """The text-tower process `serve` starts, over ViT-L-14 with random weights in the hub layout."""
    from _gpu_inputs import make_model

    from clipscope_explorer.app.meaning.service import TextSpec
    from clipscope_explorer.app.meaning.tower_process import TowerProcess

    model = make_model(REPO_ROOT / "bench" / ".cache" / "precompute" / "vit-l-14-random", "ViT-L-14")
    spec = TextSpec(model=f"local-dir:{model}", pretrained=None, device="cpu", index_precision="bf16")
    return TowerProcess(spec).start()


def process_memory(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        return {
            line.split(":")[0]: int(line.split()[1]) * 1024 for line in status if line.startswith(("RssAnon", "VmHWM"))
        }


def run_worker(mode: str, cache: Path, environment: dict[str, str] | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", mode, str(cache)]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", **(environment or {})}
    return child_figures(command, f"{mode} worker", environment)[0]


# ---------------------------------------------------------------- float16 against float32; scan alternatives


def top10(scores: np.ndarray) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:10].tolist())


def overlap(originals, queries: np.ndarray) -> float:
    """Mean top-10 overlap of exact rankings over the float32 `originals` (chunks) and their float16 copies."""
    exact, rounded = [], []
    for chunk in originals:
        exact.append(chunk.astype(np.float64) @ queries.T.astype(np.float64))
        rounded.append(chunk.astype(np.float16).astype(np.float64) @ queries.T.astype(np.float64))
    exact, rounded = np.vstack(exact), np.vstack(rounded)
    return statistics.mean(len(top10(exact[:, i]) & top10(rounded[:, i])) / 10 for i in range(len(queries)))


def scan_alternatives(rows: int = 262_144) -> dict[str, float]:
    """Milliseconds per million rows of one query against a float16 matrix, by way of scanning."""
    import torch

    from clipscope_explorer.app.meaning.torch_scan import TorchScorer
    from clipscope_explorer.app.meaning.vectors import NumpyScorer

    matrix = image_vectors(0, rows).astype(np.float16)
    query = text_like(1)[0]
    as_float32 = matrix.astype(np.float32)
    as_bf16 = torch.from_numpy(as_float32).bfloat16()
    candidates = {
        "numpy float16 bits widened to float32 by chunk, float32 product (without torch)": lambda: NumpyScorer().coarse(
            matrix, query, 0, rows
        ),
        "torch float16 product (chosen first pass)": lambda: TorchScorer().coarse(matrix, query, 0, rows),
        "torch float16 -> float32 by chunk, float32 product": lambda: [
            torch.mv(torch.from_numpy(matrix[s : s + 8192]).float(), torch.from_numpy(query))
            for s in range(0, rows, 8192)
        ],
        "torch bfloat16 product (a bfloat16 copy)": lambda: torch.mv(as_bf16, torch.from_numpy(query).bfloat16()),
        "numpy float32 product (a float32 copy: twice the memory)": lambda: as_float32 @ query,
    }
    return {name: 1e3 * min(timed(call) for _ in range(3)) * 1e6 / rows for name, call in candidates.items()}


# ---------------------------------------------------------------- the run


def p50(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    if not INDEX.exists():
        print(f"building {INDEX.name} ...")
        start = time.perf_counter()
        build_index(INDEX)
        print(f"  built in {time.perf_counter() - start:.0f} s")
    cache = CACHE / "vectors"
    shutil.rmtree(cache, ignore_errors=True)  # the first start exports the vectors: timed below
    print(f"{N_IMAGES:,} images, {N_LAYERS} x {N_FEATURES:,} features, {DIM} dimensions, {N_QUERIES} queries")
    tower = text_tower_process()
    try:
        text = run_worker("text", cache, tower.environment())
        tower_memory = process_memory(tower.process.pid)
    finally:
        tower.stop()
    baseline = run_worker("baseline", cache)
    print(f"  first start (export {N_IMAGES + N_LAYERS * N_FEATURES:,} vectors, map): {text['ready_s']:.1f} s")
    print(f"  text tower: ViT-L-14 in {text['precision']}; first pass {text['scorer']}; vectors {text['vectors']}")
    print(f"  bare text tower p50 {p50(text['tower_s']):.0f} ms")
    for kind in ("features", "images"):
        print(f"  bare scan of the {kind}, p50 {p50(text[f'scan_{kind}_s']):.0f} ms")
    print(f"  rows scored exactly after the first pass (images, one query): {text['candidates']}")
    anon = {
        name: {k: v["RssAnon"] / MB for k, v in w.items() if k.startswith("memory")}
        for name, w in (("text", text), ("baseline", baseline))
    }
    total = anon["text"]["memory_end"] - anon["baseline"]["memory_end"]
    print(
        f"  worker RssAnon (its own memory): {anon['text']['memory_end']:.0f} MB; the same worker --no-text "
        f"(baseline): {anon['baseline']['memory_end']:.0f} MB; search by meaning adds {total:.0f} MB "
        f"(torch for the scans, the mapped vectors' bookkeeping, caches, {3 * N_QUERIES + 2} queries)"
    )
    print(
        f"    the shared text-tower process (once per server, whatever --workers): RssAnon "
        f"{tower_memory['RssAnon'] / MB:.0f} MB, peak RSS {tower_memory['VmHWM'] / MB:.0f} MB"
    )
    print(
        f"    the mapped vectors: {text['mapped_vectors'] / MB:.0f} MB resident, shared page cache; "
        f"worker peak RSS {text['memory_end']['VmHWM'] / MB:.0f} MB"
    )
    queries = text_like(N_QUERIES)
    chunks = (image_vectors(s, min(s + CHUNK, N_IMAGES)) for s in range(0, N_IMAGES, CHUNK))
    images_overlap = overlap(chunks, queries)
    features_overlap = statistics.mean(overlap([prototype_vectors(layer)], queries) for layer in LAYERS)
    print(f"  float16 vs float32 top-10 overlap: images {images_overlap:.3f}, features {features_overlap:.3f}")
    print("  scan alternatives, ms per million rows (768 dims, one query, all cores):")
    for name, ms in scan_alternatives().items():
        print(f"    {ms:7.0f}  {name}")
    print_results(
        "search",
        [
            result_line("features_by_meaning_p50_ms", p50(text["features_s"]), "<=", 300, 1),
            result_line("features_by_meaning_cached_p50_ms", p50(text["cached_s"]), "<=", 20, 1),
            result_line("images_by_meaning_p50_ms", p50(text["images_s"]), "<=", 300, 1),
            result_line("worker_memory_growth_mb", total, "<=", 600, 0),  # the shared tower process printed beside
            result_line("float16_top10_overlap", min(images_overlap, features_overlap), ">=", 0.9),
        ],
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
