"""Peak memory of decoding image files, in a fresh process: `python -m tests.memory_probe KIND AT_ONCE FILE...`.

KIND is `upload` (the server's decode and stored view of the uploaded bytes) or `precompute` (the job's
folder source: read, decode, preprocess, thumbnail, batch; each file alone in its folder). AT_ONCE threads
take the same file together, as the server's decoding threads may. Prints one JSON object: {file: bytes
the peak RSS rose by}; a file that is not decoded is an error (exit status 1).

A regression must not take the machine down with it: after warming up, the probe's data segment may grow
by `HEADROOM` at most (RLIMIT_DATA), so a runaway allocation fails with MemoryError instead.

The peak is the kernel's VmHWM, reset before each file through /proc/self/clear_refs (Linux 4.0+); where
that is refused, the high-water mark before the file is the baseline, which can only under-count growth
below it (the gigabytes this guards against are far above it).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import threading
from collections.abc import Callable
from pathlib import Path

Job = Callable[[], None]
HEADROOM = 5 << 29  # 2.5 GiB: room for the largest test (two 88-megapixel decodes at once, 1.4 GB), not a runaway


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_growth(job: Job) -> int:
    """Bytes the peak RSS rose above the RSS before `job()`."""
    gc.collect()
    baseline = _status_bytes("VmRSS") if _reset_peak() else _status_bytes("VmHWM")
    job()
    return max(0, _status_bytes("VmHWM") - baseline)


def upload_job(path: Path, preprocess) -> Job:
    from clipscope_explorer.app.live.input import decode, view_jpeg
    from clipscope_explorer.app.live.store import VIEW_SIZE

    data = path.read_bytes()  # an upload's bytes are in memory before it is decoded
    return lambda: view_jpeg(decode(data, preprocess).image, VIEW_SIZE)


def precompute_job(path: Path, preprocess) -> Job:
    from clipscope_explorer.precompute.sources import ShardBatches, resolve_sources

    def job() -> None:
        batches = list(ShardBatches(resolve_sources([str(path.parent)]), preprocess, batch_size=4, thumb_size=224))
        if [len(batch.samples) for batch in batches] != [1]:
            raise RuntimeError(f"{path} was not decoded: {[s.error for b in batches for s in b.skipped]}")

    return job


def together(job: Job, at_once: int) -> Job:
    """`job` run by `at_once` threads at the same time; the first failure is raised."""

    def run() -> None:
        failures: list[BaseException] = []

        def guarded() -> None:
            try:
                job()
            except BaseException as error:  # handed to the caller below
                failures.append(error)

        threads = [threading.Thread(target=guarded) for _ in range(at_once)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]

    return run


def main(kind: str, at_once: int, files: list[str]) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    preprocess = image_transform_v2(PreprocessCfg(size=224), is_train=False)  # CLIP ViT-L/14's preprocessing
    make_job = {"upload": upload_job, "precompute": precompute_job}[kind]
    warm = Path(files[0]).parent.parent / "warm-up" / "warm.png"
    warm.parent.mkdir(exist_ok=True)
    Image.new("RGB", (300, 200), (9, 9, 9)).save(warm)
    together(make_job(warm, preprocess), at_once)()
    resource.setrlimit(resource.RLIMIT_DATA, (_status_bytes("VmData") + HEADROOM, resource.RLIM_INFINITY))
    print(json.dumps({name: peak_growth(together(make_job(Path(name), preprocess), at_once)) for name in files}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
