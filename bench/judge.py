"""The openai judge's throughput: sort-evaluation trials per second against a local OpenAI-compatible endpoint
that answers every request after 200 ms, at the default concurrency (8 requests in flight).

The endpoint is tests/fake_openai.py in a process of its own (always `ANSWER: 1`, after `BENCH_JUDGE_LATENCY`
seconds). The images are the thumbnails of a small synthetic index written with bench/serve.py's builder (224 px
noise JPEGs like its full-scale one; cached in bench/.cache/judge). Every trial draws fresh random grids, so the
judge's montage cache never helps: each trial decodes its 19 images, composes two 3 x 3 montages, encodes three
JPEGs (about 0.4 MB of base64 JSON) and writes its answer to a disk cache, as a real run does.

What limits it: the ideal is concurrency / latency = 8 / 0.2 s = 40 trials/s; building each request (decoding
and JPEG encoding, in up to 4 threads) takes CPU from the same 2 cores the fake endpoint parses the requests
on, which stretches each round trip beyond 200 ms. A real vision-language model answers in seconds, not
200 ms: there the endpoint, not the judge, is the limit, and `concurrency` is the knob.
1. throughput >= 20 trials/s (half the ideal).
Each of BENCH_JUDGE_REPEATS rounds (3) judges BENCH_JUDGE_TRIALS trials (300); the median round counts.

Run from the repo root: python bench/judge.py
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import serve
from _timing import REPO_ROOT, interleaved_medians, result_line

CACHE = REPO_ROOT / "bench" / ".cache" / "judge"
TRIALS = int(os.environ.get("BENCH_JUDGE_TRIALS", 300))
REPEATS = int(os.environ.get("BENCH_JUDGE_REPEATS", 3))
LATENCY_S = float(os.environ.get("BENCH_JUDGE_LATENCY", 0.2))
N_IMAGES = 2_000  # images with thumbnails
TARGET = 20.0


def index_path():
    path = CACHE / "index.duckdb"
    if not path.is_file():
        print(f"generating the synthetic index at {path} (once)")
        path.parent.mkdir(parents=True, exist_ok=True)
        serve.LAYERS, serve.N_FEATURES, serve.TOP_N = (20,), 256, 9
        serve.N_IMAGES, serve.N_SAMPLES = N_IMAGES, 2 * N_IMAGES
        serve.build_index(path)
    return path


def start_endpoint() -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tests.fake_openai", "--latency", str(LATENCY_S), "--default", "one"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        raise SystemExit(f"the fake endpoint did not start (it printed {url!r})")
    return process, url


def trials(count: int, seed: int):
    from clipscope_explorer.precompute.evaluate.judging import Trial

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.choice(N_IMAGES, 19, replace=False).tolist()
        out.append(Trial(tuple(ids[:9]), tuple(ids[9:18]), ids[18]))
    return out


def main() -> None:
    from clipscope_explorer.precompute.evaluate.openai_judge import OpenAIJudge
    from clipscope_explorer.precompute.evaluate.sample_images import SampleImages

    index = index_path()
    endpoint, url = start_endpoint()
    seeds = itertools.count()
    try:
        with tempfile.TemporaryDirectory() as cache, SampleImages(index) as images:
            judge = OpenAIJudge(url, "fake-vlm", images, cache_dir=cache, progress=False)
            print(f"judging {TRIALS} trials a round against {url} answering after {LATENCY_S * 1000:.0f} ms,")
            print(f"concurrency {judge.concurrency}: ideal {judge.concurrency / LATENCY_S:.0f} trials/s")

            def round_() -> None:
                batch = trials(TRIALS, next(seeds))  # fresh trials: none is in the disk cache
                start = time.perf_counter()
                answers = judge.answer(batch)
                seconds = time.perf_counter() - start
                assert answers == [1] * TRIALS, "the endpoint answers 1 to every trial"
                print(f"  {TRIALS / seconds:.1f} trials/s")

            medians, _ = interleaved_medians({"judge": round_}, repeats=REPEATS, warmup=1)
            report = judge.report()
    finally:
        endpoint.kill()
        endpoint.wait()
    print(f"  report: {report}")
    line, _ = result_line("openai_judge_trials_per_s", TRIALS / medians["judge"], ">=", TARGET, digits=1)
    print(line)


if __name__ == "__main__":
    main()
