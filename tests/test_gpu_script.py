"""bench/gpu.sh --dry-run: the GPU check's every step on the CPU at tiny sizes, so the script cannot rot while
no GPU runs it. Checks its RESULT lines against their own numbers, its JSON summary, and what it built."""

from __future__ import annotations

import json
import operator
import os
import re
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import pytest

from clipscope_explorer.precompute.job import PrecomputeConfig

REPO = Path(__file__).resolve().parents[1]
FIGURES = [
    "gpu_precompute_img_s",
    "gpu_precompute_bare_ratio",
    "gpu_fidelity_fp32_vs_cpu_same_sets",
    "gpu_fidelity_fp32_vs_cpu_max_rel_diff_pct",
    "gpu_fidelity_bf16_vs_fp32_max_rel_diff_pct",
    "gpu_8_layers_state_gb_per_layer",
    "gpu_8_layers_peak_gb",
    "live_gpu_p50_ms",
]
RESULT = re.compile(r"^RESULT (\S+) (-?[0-9.]+)(?:/([0-9]+))? target (<=|>=|==)([0-9.]+)(?:/[0-9]+)? (PASS|MISS)$")
OPS = {"<=": operator.le, ">=": operator.ge}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    out, work = root / "out", root / "work"
    done = subprocess.run(
        ["bash", "bench/gpu.sh", str(out), "--dry-run", "--work", str(work)],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout.strip().splitlines(), json.loads((out / "gpu.json").read_text()), out, work


@pytest.mark.slow
def test_result_lines_agree_with_their_targets_and_the_summary(dry_run):
    lines, summary, out, _ = dry_run
    results = [line for line in lines if line.startswith("RESULT ")]
    assert lines[-1] == results[-1], "the last line is the summary RESULT line"
    parsed = [RESULT.match(line) for line in results]
    assert all(parsed), results
    assert [m.group(1) for m in parsed] == FIGURES + ["gpu"]
    passed = 0
    for match in parsed[:-1]:
        measured, op, target, verdict = float(match.group(2)), match.group(4), float(match.group(5)), match.group(6)
        assert verdict == ("PASS" if OPS[op](measured, target) else "MISS"), match.group(0)
        passed += verdict == "PASS"
    last = parsed[-1]
    assert (int(float(last.group(2))), int(last.group(3))) == (passed, len(FIGURES))
    assert last.group(6) == ("PASS" if passed == len(FIGURES) else "MISS")
    assert summary["results"] == results[:-1]
    assert (out / "gpu.log").read_text().strip().splitlines()[-1] == lines[-1]  # the wrapper kept the output


@pytest.mark.slow
def test_summary_holds_the_figures_the_results_were_made_of(dry_run):
    lines, summary, _, _ = dry_run
    assert summary["dry_run"] is True and summary["gpu"].startswith("cpu")
    assert set(summary) >= {
        "date",
        "torch",
        "plan",
        "target_images_per_s",
        "precompute",
        "fidelity",
        "eight_layers",
        "live",
        "stages_s",
        "results",
    }
    pre = summary["precompute"]
    assert [s["batch_size"] for s in pre["sweep"]] == list(summary["plan"]["batch_sizes"])
    assert summary["errors"] == {} and not any("error" in s for s in pre["sweep"])
    assert pre["best_batch_size"] == max(pre["sweep"], key=lambda s: s["images_per_s"])["batch_size"]
    main = pre["main"]
    assert main["index_written"] and not any(s["index_written"] for s in pre["sweep"])  # timed runs stop early
    assert main["images_per_s"] == pytest.approx(main["images"] / main["seconds"], rel=0.01)
    assert pre["bare_ratio"] == pytest.approx(pre["bare_images_per_s"] / main["images_per_s"], rel=0.01)
    assert f"RESULT gpu_precompute_img_s {main['images_per_s']:.1f} " in "\n".join(lines)
    live = summary["live"]
    assert len(live["latencies_ms"]) == summary["plan"]["uploads"]
    assert live["p50_ms"] == pytest.approx(statistics.median(live["latencies_ms"]), abs=0.02)


@pytest.mark.slow
def test_the_full_run_indexed_every_image_of_its_shards(dry_run):
    _, summary, _, _ = dry_run
    with duckdb.connect(summary["precompute"]["main"]["index"], read_only=True) as con:
        meta = {key: json.loads(value) for key, value in con.execute("SELECT key, value FROM meta").fetchall()}
    samples = 0
    for shard in meta["sample"]["sources"]:
        with tarfile.open(shard) as tar:
            samples += sum(member.name.endswith(".jpg") for member in tar.getmembers())
    assert meta["sample"]["n_images"] == samples == summary["precompute"]["main"]["images_total"]
    assert meta["layers"] == [20]


@pytest.mark.slow
def test_fidelity_and_state_on_the_cpu(dry_run):
    _, summary, _, _ = dry_run
    fidelity = summary["fidelity"]
    # on the CPU "the device" is the CPU: the two fp32 runs are the same computation, to the bit
    assert fidelity["fp32_vs_cpu_fp32"] == {"same_sets": 1.0, "max_rel_diff": 0.0, "median_rel_diff": 0.0}
    assert 0 < fidelity["bf16_vs_fp32"]["max_rel_diff"] < 0.05  # bf16 really ran, and stays close
    plan, defaults = summary["plan"], PrecomputeConfig(images=[], out=Path("unused"))
    heatmaps = plan["n_features"] * (defaults.top_n + defaults.band_samples) * 256  # uint8, 256 patches each
    assert summary["eight_layers"]["layers"] == [2, 5, 8, 11, 14, 17, 20, 22]
    assert summary["eight_layers"]["example_lists_on"] == ["cpu"]  # the run's device (cuda on a GPU)
    assert summary["eight_layers"]["state_gb_per_layer"] * 1e9 >= heatmaps
