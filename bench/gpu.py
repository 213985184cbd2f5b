"""The precompute job and live encoding on one GPU, proved in one command (about 6 minutes on an H100-class card).

    bench/gpu.sh OUT_DIR                  installs the project from .whl/ where it does not import, runs this
    python bench/gpu.py OUT_DIR [--dry-run] [--work DIR]

Everything runs through the project's own entry points: `precompute.job.run` (sources, DataLoader workers,
bf16 autocast, accumulators on the device, checkpoints, the index) and `clipscope-explorer serve` for
uploads. The inputs are made on the fly: ViT-L/14 with random weights in the hub layout, one random
full-size SAE (1024 x 65,536, k 32) linked as each of the eight released layers, and synthetic 224 px
scenes (JPEG, quality 95) in webdataset shards, 8,192 distinct images listed as often as a run needs.
1. precompute at layer 20: images/s over a window after warm-up, batch size swept; then the best batch
   size for 60 s, run to its finished index: >= 2,500 img/s on an H100 (scaled by the GPU's dense bf16
   peak on other models); the bare model + SAE on pixels already on the device, same batch size and
   precision, in the same run: bare / job <= 1.15;
2. fidelity on 64 images: GPU fp32 against CPU fp32 (share of tokens with the same top-k index set
   >= 0.9; largest difference of the sorted top-k values, relative to the token's largest, <= 0.2 %) and
   GPU bf16 against GPU fp32 (<= 5 %; its share of identical sets is printed);
3. all eight layers at once: images/s, peak GPU memory (<= 80 GB, one H100) and the accumulators'
   state per layer (the README's estimate: about 1 GB; <= 1.25 GB);
4. live encoding: median latency of one upload through the server on the index of 1. (<= 60 ms).
One RESULT line per figure, then the summary line; OUT_DIR/gpu.json holds every figure.
--dry-run runs the same steps on the CPU with a tiny model and a few images, in about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _gpu_inputs import LAYER, RELEASED_LAYERS, make_inputs, shard_list
from _job_clock import timed_run
from _model_alone import bare_images_s, components_for, fidelity, first_pixels
from _timing import REPO_ROOT, print_results, result_line
from live import Uploader, free_port

H100_IMAGES_S, H100_BF16_TFLOPS = 2500, 989
# Dense bf16 peak (vendor datasheets), most specific name first; the throughput target scales with it.
BF16_TFLOPS = (
    ("H100 PCIe", 756),
    ("H100 NVL", 835),
    ("H200 NVL", 835),
    ("GH200", 989),
    ("H100", 989),
    ("H200", 989),
    ("H800", 989),
    ("B200", 2250),
    ("A100", 312),
    ("L40S", 362),
    ("L4", 121),
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run of the script; seconds are wall-clock windows."""

    device: str
    architecture: str  # an open_clip name, or "tiny" (see _gpu_inputs.make_model)
    n_features: int
    k: int
    batch_sizes: tuple[int, ...]
    distinct_shards: int
    shard_size: int
    most_images_s: int  # a generous bound on the rate: how many images a stopping run is given
    warmup_s: float
    sweep_s: float
    main_s: float
    eight_s: float
    bare_s: float
    fidelity_images: int
    uploads: int
    ready_s: float  # for the server to load its model


GPU = Plan(
    device="cuda",
    architecture="ViT-L-14",
    n_features=65_536,
    k=32,
    batch_sizes=(128, 256, 512),
    distinct_shards=8,
    shard_size=1024,
    most_images_s=10_000,
    warmup_s=5,
    sweep_s=8,
    main_s=60,
    eight_s=12,
    bare_s=8,
    fidelity_images=64,
    uploads=30,
    ready_s=300,
)
DRY = Plan(
    device="cpu",
    architecture="tiny",
    n_features=256,
    k=8,
    batch_sizes=(4, 8),
    distinct_shards=2,
    shard_size=16,
    most_images_s=400,
    warmup_s=0.2,
    sweep_s=0.4,
    main_s=1.0,
    eight_s=0.4,
    bare_s=0.2,
    fidelity_images=4,
    uploads=4,
    ready_s=120,
)


def job_config(inputs: dict, plan: Plan, work: Path, name: str, batch_size: int, layers, shards: list[str]):
    from clipscope_explorer.precompute.job import PrecomputeConfig

    return PrecomputeConfig(
        images=shards,
        out=work / f"{name}.duckdb",
        model=inputs["model"],
        sae=inputs["sae"],
        layers=list(layers),
        batch_size=batch_size,
        device=plan.device,
        workers=max(1, min(14, (os.cpu_count() or 2) - 2)),
        progress=False,
        fresh=True,
    )


# ------------------------------------------------------------------ live encoding through the server


def upload_latencies(index: Path, plan: Plan, work: Path) -> dict:
    """Median latency of one upload through `clipscope-explorer serve` on `index`, encoding on the device."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store = work / "uploads"
    shutil.rmtree(store, ignore_errors=True)
    env = dict(
        os.environ,
        CLIPSCOPE_LIVE_DEVICE=plan.device,
        CLIPSCOPE_UPLOAD_STORE=str(store),
        CLIPSCOPE_UPLOAD_RATE_LIMIT="0",
        CLIPSCOPE_UPLOAD_SLOTS_PER_CLIENT="0",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "clipscope_explorer.cli", "serve", str(index), "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        deadline, live = time.time() + plan.ready_s, {"state": "starting"}
        while live["state"] not in ("ready", "failed", "off"):
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server {'exited' if server.poll() is not None else 'did not get ready'}")
            time.sleep(0.5)
            try:
                live = httpx.get(base + "/api/upload", timeout=5).json()["live"]
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        if live["state"] != "ready":
            raise SystemExit(f"live encoding is {live['state']}: {live.get('message')}")
        client = Uploader(base, 1)
        warm = [client.upload() for _ in range(3)]
        latencies = [client.upload() for _ in range(plan.uploads)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    p50 = statistics.median(latencies) * 1e3
    print(
        f"  {live['precision']} on {plan.device}: p50 {p50:.1f} ms over {len(latencies)} uploads "
        f"(min {min(latencies) * 1e3:.1f}, max {max(latencies) * 1e3:.1f}; first warm-up {warm[0] * 1e3:.0f} ms)"
    )
    return {
        "precision": live["precision"],
        "p50_ms": round(p50, 2),
        "latencies_ms": [round(t * 1e3, 2) for t in latencies],
    }


# ------------------------------------------------------------------ the whole check


def device_and_target(plan: Plan) -> tuple[str, float, str]:
    if plan.device != "cuda":
        return "cpu (dry run)", H100_IMAGES_S, "dry run: the H100 target, unscaled"
    name = torch.cuda.get_device_name()
    for part, tflops in BF16_TFLOPS:
        if part in name:
            return name, H100_IMAGES_S * tflops / H100_BF16_TFLOPS, f"{tflops} bf16 TFLOP/s dense"
    return name, H100_IMAGES_S, "bf16 peak unknown: the H100 target, unscaled"


def precompute_stage(inputs: dict, plan: Plan, work: Path, held: dict) -> dict:
    """The batch-size sweep, the full run at the best size, and the bare model + SAE at that size (its config
    and loaded components are left in `held` for the stages after)."""
    timed, sweep = plan.most_images_s * (plan.warmup_s + plan.sweep_s), []
    for bs in plan.batch_sizes:
        try:
            config = job_config(inputs, plan, work, f"sweep-{bs}", bs, [LAYER], shard_list(inputs, timed))
            sweep.append(timed_run(config, plan.warmup_s, plan.sweep_s, stop=True))
        except Exception as error:  # one batch size failing (memory, say) leaves the others to choose from
            traceback.print_exc()
            sweep.append({"batch_size": bs, "error": f"{type(error).__name__}: {error}", "images_per_s": 0.0})
    best = max(sweep, key=lambda s: s["images_per_s"])
    if "error" in best:
        raise RuntimeError("every batch size of the sweep failed")
    shards = shard_list(
        inputs, max(best["images_per_s"] * (plan.warmup_s + plan.main_s) * 1.15, 8 * best["batch_size"])
    )
    print(
        f"  best batch size {best['batch_size']}: the whole job on {len(shards) * plan.shard_size:,} images, "
        f"timed for {plan.main_s:.0f} s after warm-up, to its index"
    )
    config = held["config"] = job_config(inputs, plan, work, "main", best["batch_size"], [LAYER], shards)
    main_run = {
        **timed_run(config, plan.warmup_s, plan.main_s, stop=False),
        "images_total": len(shards) * plan.shard_size,
        "index": str(config.out),
    }
    components = held["components"] = components_for(config)
    pixels = first_pixels(components, config.batch_size).to(components.device)
    bare = bare_images_s(components, pixels, plan.bare_s)
    ratio = bare / main_run["images_per_s"]
    print(f"  bare model + SAE ({components.precision}): {bare:,.0f} img/s; bare / job {ratio:.3f}")
    return {
        "sweep": sweep,
        "best_batch_size": config.batch_size,
        "main": main_run,
        "bare_images_per_s": round(bare, 1),
        "bare_ratio": round(ratio, 4),
    }


def eight_layers_stage(inputs: dict, plan: Plan, work: Path, batch_size: int) -> dict:
    """The released layers in one run: its rate, its accumulators' state, and the peak of device memory."""
    device = torch.device(plan.device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def memory(state) -> dict:
        accumulators = state.accumulators.values()
        per_layer = statistics.mean(acc.state_bytes() for acc in accumulators)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        held_on = {
            t.device.type for acc in accumulators for t in (*vars(acc.top).values(), *vars(acc.samples).values())
        }
        return {
            "state_gb_per_layer": round(per_layer / 1e9, 4),
            "example_lists_on": sorted(held_on),
            "peak_gb": None if peak is None else round(peak / 1e9, 2),
        }

    shards = shard_list(inputs, plan.most_images_s * (plan.warmup_s + plan.eight_s))
    eight = timed_run(
        job_config(inputs, plan, work, "eight", batch_size, RELEASED_LAYERS, shards),
        plan.warmup_s,
        plan.eight_s,
        stop=True,
        on_state=memory,
    )
    eight["hours_per_million_images"] = round(1e6 / max(eight["images_per_s"], 1e-9) / 3600, 2)
    print(
        f"  accumulator state {eight['state_gb_per_layer']:.3f} GB per layer; peak GPU memory "
        f"{eight['peak_gb'] if eight['peak_gb'] is not None else '-'} GB; one million images in "
        f"{eight['hours_per_million_images']:.1f} h at this rate"
    )
    return eight


def figure(stage: dict | None, *path: str) -> float:
    """A number from a stage's figures; NaN (a MISS) when the stage failed."""
    for key in path:
        if stage is None:
            return math.nan
        stage = stage.get(key)
    return math.nan if stage is None else float(stage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO_ROOT / "bench" / ".cache" / "gpu",
        help="folder for the model, SAE, shards and indexes (kept between runs)",
    )
    args = parser.parse_args()
    plan = DRY if args.dry_run else GPU
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: `bench/gpu.py OUT_DIR --dry-run` runs the same steps on the CPU")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CLIPSCOPE_CACHE", str(work / "cache"))
    torch.set_grad_enabled(False)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny matrices: more threads only spin, against whatever else runs (CI)
    gpu, target, scaling = device_and_target(plan)
    machine = {
        "cpus": os.cpu_count(),
        "shm_free_gb": round(shutil.disk_usage("/dev/shm").free / 1e9, 1) if os.path.isdir("/dev/shm") else None,
    }  # DataLoader workers hand batches over through /dev/shm
    print(
        f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; {machine['cpus']} CPUs, "
        f"/dev/shm {machine['shm_free_gb']} GB free; target {target:,.0f} img/s ({scaling})"
        + ("; a dry run: the figures below test the script, they measure nothing" if args.dry_run else "")
    )
    started = time.perf_counter()
    summary = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "dry_run": args.dry_run,
        "machine": machine,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "plan": asdict(plan),
        "target_images_per_s": round(target, 1),
        "target_scaling": scaling,
        "errors": {},
        "stages_s": {},
    }

    def attempt(name: str, run):
        """One stage; a failure is printed and recorded, and the later stages still run (GPU time is scarce: one
        run should bring back every figure it can). The summary is saved after every stage."""
        begun = time.perf_counter()
        try:
            summary[name] = run()
        except (Exception, SystemExit) as error:  # noqa: BLE001 - whatever stops a stage
            traceback.print_exc()
            summary[name], summary["errors"][name] = None, f"{type(error).__name__}: {error}"
        finally:
            summary["stages_s"][name] = round(time.perf_counter() - begun, 1)
            (args.out / "gpu.json").write_text(json.dumps(summary, indent=2))
        return summary[name]

    inputs = attempt(
        "inputs",
        lambda: make_inputs(work, plan.architecture, plan.n_features, plan.k, plan.distinct_shards, plan.shard_size),
    )
    if inputs is None:
        return 1
    held = {"config": job_config(inputs, plan, work, "main", plan.batch_sizes[0], [LAYER], inputs["shards"])}
    print(f"1. precompute, layer {LAYER}, batch sizes {', '.join(map(str, plan.batch_sizes))}")
    precompute = attempt("precompute", lambda: precompute_stage(inputs, plan, work, held))
    print("2. fidelity: bf16 and fp32 on the device, fp32 on the CPU")
    fid = attempt(
        "fidelity", lambda: fidelity(held["config"], plan.device, plan.fidelity_images, held.pop("components", None))
    )
    for pair in ("bf16_vs_fp32", "fp32_vs_cpu_fp32", "bf16_vs_cpu_fp32") if fid else ():
        print(
            f"  {pair}: same top-{plan.k} sets {fid[pair]['same_sets']:.3f}, relative difference max "
            f"{fid[pair]['max_rel_diff']:.2e}, median {fid[pair]['median_rel_diff']:.2e}"
        )
    print(f"3. all eight layers at once, batch {held['config'].batch_size}")
    eight = attempt("eight_layers", lambda: eight_layers_stage(inputs, plan, work, held["config"].batch_size))
    print("4. live encoding: uploads through `clipscope-explorer serve` on the index of 1.")
    live = attempt("live", lambda: upload_latencies(Path(held["config"].out), plan, work))

    results = [
        result_line("gpu_precompute_img_s", figure(precompute, "main", "images_per_s"), ">=", target, 1),
        result_line("gpu_precompute_bare_ratio", figure(precompute, "bare_ratio"), "<=", 1.15),
        result_line("gpu_fidelity_fp32_vs_cpu_same_sets", figure(fid, "fp32_vs_cpu_fp32", "same_sets"), ">=", 0.9),
        result_line(
            "gpu_fidelity_fp32_vs_cpu_max_rel_diff_pct",
            100 * figure(fid, "fp32_vs_cpu_fp32", "max_rel_diff"),
            "<=",
            0.2,
            4,
        ),
        result_line(
            "gpu_fidelity_bf16_vs_fp32_max_rel_diff_pct", 100 * figure(fid, "bf16_vs_fp32", "max_rel_diff"), "<=", 5, 3
        ),
        result_line("gpu_8_layers_state_gb_per_layer", figure(eight, "state_gb_per_layer"), "<=", 1.25),
        result_line("gpu_8_layers_peak_gb", figure(eight, "peak_gb") if plan.device == "cuda" else 0.0, "<=", 80, 2),
        result_line("live_gpu_p50_ms", figure(live, "p50_ms"), "<=", 60, 1),
    ]
    summary["stages_s"]["total"] = round(time.perf_counter() - started, 1)
    summary["results"] = [line for line, _ in results]
    (args.out / "gpu.json").write_text(json.dumps(summary, indent=2))
    print(f"stages (s): {json.dumps(summary['stages_s'])}; every figure in {args.out / 'gpu.json'}")
    for name, error in summary["errors"].items():
        print(f"FAILED {name}: {error}")
    print_results("gpu", results)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
