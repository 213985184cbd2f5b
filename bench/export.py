"""Bulk export at full scale: memory stays bounded whatever the index size.

Exports the full-scale synthetic index of bench/serve.py (8 layers x 65,536 features x 32 top examples, each
with a 16 x 16 heatmap; 50,000 images with thumbnails; made once by its builder and cached in
bench/.cache/serve) with `clipscope-explorer export --with-heatmaps` to Parquet, in a fresh process, and
reports its wall time, rows per second and output size, and its peak resident set size (the child's
ru_maxrss, from wait4):
1. peak RSS <= 1,000 MB.
The export is written to bench/.cache/export/out and removed afterwards (BENCH_EXPORT_KEEP=1 keeps it); at
full scale it takes about 23 GB there for a while (the synthetic heatmaps are random bytes, which compress
poorly: about 1.4 KB an example, against a few hundred bytes for real, mostly empty heatmaps).

For development, smaller sizes (their own index, cached in bench/.cache/export): BENCH_EXPORT_LAYERS (layers,
at most 8), BENCH_EXPORT_FEATURES (per layer), BENCH_EXPORT_TOP_N (examples per feature), BENCH_EXPORT_IMAGES
(images shown), BENCH_EXPORT_SAMPLES (images encoded); BENCH_EXPORT_FORMAT=jsonl and
BENCH_EXPORT_THUMBNAILS=1 (add --with-images) for the other variants. The target is judged at full scale.

Run from the repo root: python bench/export.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import serve
from _timing import REPO_ROOT, result_line

CACHE = REPO_ROOT / "bench" / ".cache" / "export"
TARGET_MB = 1000
FULL = {"layers": 8, "features": 65_536, "top_n": 32, "images": 50_000, "samples": 1_000_000}


def sizes() -> dict[str, int]:
    chosen = {name: int(os.environ.get(f"BENCH_EXPORT_{name.upper()}", full)) for name, full in FULL.items()}
    chosen["layers"] = min(chosen["layers"], len(serve.LAYERS))
    chosen["images"] = min(chosen["images"], chosen["samples"])
    return chosen


def index_path(size: dict[str, int]):
    if size == FULL:
        return serve.CACHE / "full.duckdb"
    name = "x".join(str(size[k]) for k in ("layers", "features", "top_n")) + f"-{size['images']}-{size['samples']}"
    return CACHE / f"{name}.duckdb"


def build(size: dict[str, int]) -> None:
    """Write the synthetic index of this size with bench/serve.py's builder."""
    if size != FULL:
        serve.LAYERS, serve.N_FEATURES, serve.TOP_N = serve.LAYERS[: size["layers"]], size["features"], size["top_n"]
        serve.N_IMAGES, serve.N_SAMPLES = size["images"], size["samples"]
    path = index_path(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    serve.build_index(path)


def main() -> None:
    size = sizes()
    if sys.argv[1:] == ["--build"]:
        build(size)
        return
    index = index_path(size)
    if not index.is_file():  # built in a process of its own, so this one stays small (the export forks from it)
        print(f"generating the synthetic index at {index} (once; cached)")
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build"], check=True)
        print(f"  generated in {time.perf_counter() - start:.0f} s, {index.stat().st_size / 2**30:.2f} GiB")
    out = CACHE / "out"
    shutil.rmtree(out, ignore_errors=True)
    fmt = os.environ.get("BENCH_EXPORT_FORMAT", "parquet")
    command = [sys.executable, "-m", "clipscope_explorer.cli", "export", str(index), "--out", str(out)]
    command += ["--format", fmt, "--with-heatmaps"]
    if os.environ.get("BENCH_EXPORT_THUMBNAILS") == "1":
        command.append("--with-images")
    print(f"exporting {index.name} ({size}) as {fmt} with heatmaps")
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO_ROOT)  # progress bars go to this terminal's stderr
    _, status, usage = os.wait4(child.pid, 0)  # reaps it: its own rusage, not that of every child
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"export failed with exit status {child.returncode}")
    info = json.loads((out / "dataset_info.json").read_text())
    rows = {name: table["rows"] for name, table in info["tables"].items()}
    written = sum(path.stat().st_size for path in out.iterdir())
    peak_mb = usage.ru_maxrss / 1024  # Linux: kilobytes
    print(f"  rows: {rows}")
    print(f"  {seconds:.1f} s, {sum(rows.values()) / seconds:,.0f} rows/s, {written / 2**30:.2f} GiB written")
    print(f"  peak RSS of the export process: {peak_mb:.0f} MB")
    if os.environ.get("BENCH_EXPORT_KEEP") != "1":
        shutil.rmtree(out)
    print(result_line("export_peak_rss_mb", peak_mb, "<=", TARGET_MB, digits=0)[0])


if __name__ == "__main__":
    main()
