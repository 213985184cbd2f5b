"""Crash safety and distribution: a killed run resumes to the same index; Ray equals one process."""

import math
import signal
import subprocess
import sys

import pytest

from clipscope_explorer.precompute.job import run
from tests.conftest import precompute_config
from tests.fixtures import index_contents

KILL_AFTER_IMAGES = 16
# The precompute command, killed (SIGKILL) at one precise point: once the run state has been saved with at least
# argv[1] images in it, right after the next batch is encoded and its images spilled (work the save lacks).
KILLED_AFTER_SAVE = """
import os, runpy, signal, sys
from clipscope_explorer.precompute import job
from clipscope_explorer.precompute.workdir import WorkDir

threshold, saved = int(sys.argv[1]), []
save, keep = job.checkpoint, WorkDir.keep_images

def checkpoint(workdir, state):
    save(workdir, state)
    saved.append(state.n_images)

def keep_images(self, samples):
    keep(self, samples)
    if saved and saved[-1] >= threshold:
        print(saved[-1], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

job.checkpoint, WorkDir.keep_images = checkpoint, keep_images
sys.argv = [sys.argv[0], *sys.argv[2:]]
runpy.run_module("clipscope_explorer.precompute", run_name="__main__")
"""


def cli_args(config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipscope_explorer.precompute",
        "--images",
        *config.images,
        "--out",
        str(config.out),
        "--model",
        config.model,
        "--sae",
        config.sae,
        "--layers",
        ",".join(map(str, config.layers)),
        "--top-n",
        str(config.top_n),
        "--band-size",
        str(config.band_size),
        "--batch-size",
        str(config.batch_size),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--save-state-every",
        str(config.checkpoint_every),
        "--no-progress",
    ]


def assert_same_index(a: dict, b: dict, float_tolerance: float = 0.0) -> None:
    assert a["meta"] == b["meta"]
    for table in ("images", "examples", "samples", "sample_codes", "vocabulary"):
        assert a[table] == b[table], table
    for table in ("layers", "features"):
        assert len(a[table]) == len(b[table])
        for row_a, row_b in zip(a[table], b[table]):
            for x, y in zip(row_a, row_b):
                if float_tolerance and isinstance(x, float):
                    assert math.isclose(x, y, rel_tol=float_tolerance, abs_tol=1e-12)
                elif float_tolerance and isinstance(x, list) and x and isinstance(x[0], float):
                    assert all(math.isclose(p, q, rel_tol=float_tolerance, abs_tol=1e-9) for p, q in zip(x, y))
                else:
                    assert x == y


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir, tiny_model_spec, tiny_sae_repo):
    out = tmp_path_factory.mktemp("ref") / "ref.duckdb"
    config = precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, out, band_samples=24)
    return index_contents(run(config))


def test_kill_and_resume_gives_identical_index(tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, reference):
    out = tmp_path / "resumed.duckdb"
    config = precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, out, checkpoint_every=8)
    command = cli_args(config)  # python -m clipscope_explorer.precompute ARGS...
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_SAVE, str(KILL_AFTER_IMAGES), *command[3:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed where planned:\n{killed.stderr}"
    saved = int(killed.stdout.split()[-1])
    assert saved >= KILL_AFTER_IMAGES
    assert not out.exists(), "a killed run must not leave an index at --out"
    assert (tmp_path / "resumed.duckdb.work" / "state.pt").exists()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f": {saved} images done" in resumed.stderr, resumed.stderr  # resumed from the saved state
    assert not (tmp_path / "resumed.duckdb.work").exists()
    assert_same_index(index_contents(out), reference)


def test_different_command_refuses_unfinished_work(tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo):
    from clipscope_explorer.precompute.workdir import WorkDir, WorkDirError

    out = tmp_path / "x.duckdb"
    WorkDir(out, {"some": "other run"}).open()
    config = precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, out)
    with pytest.raises(WorkDirError, match="different command.*--fresh"):
        run(config)
    config.fresh = True
    assert run(config) == out


@pytest.mark.slow
def test_ray_two_workers_equal_single_process(tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, reference):
    import ray

    out = tmp_path / "ray.duckdb"
    config = precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, out, band_samples=24, ray="auto", workers=2)
    try:
        run(config)
    finally:
        ray.shutdown()
    assert_same_index(index_contents(out), reference, float_tolerance=1e-9)


@pytest.mark.parametrize("n_shards, n_workers", [(1, 2), (3, 2), (16, 2), (100, 3), (1000, 8)])
def test_ray_hands_out_every_shard_once_in_small_groups(n_shards, n_workers):
    from clipscope_explorer.precompute.distributed import CALLS_PER_WORKER, _calls

    todo = list(range(5, 5 + n_shards))
    calls = list(_calls(todo, n_workers))
    assert [shard for call in calls for shard in call] == todo
    assert len(calls) <= CALLS_PER_WORKER * n_workers and all(calls)
    assert max(map(len, calls)) - min(map(len, calls[:-1] or calls)) <= 0  # equal groups, the last one shorter
