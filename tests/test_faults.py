"""Faults of the precompute job: a full disk loses nothing and resumes once space is freed."""

import hashlib
import shutil
import subprocess

import pytest

from clipscope_explorer.cli import main
from tests.fixtures import index_contents


def cli(shard_dir, model_spec, sae, out):
    return [
        "precompute",
        "--images",
        f"{shard_dir}/{{00000..00002}}.tar",
        "--out",
        str(out),
        "--model",
        model_spec,
        "--sae",
        str(sae),
        "--layers",
        "1,2",
        "--top-n",
        "6",
        "--band-size",
        "2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--save-state-every",
        "8",
        "--no-progress",
    ]


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs: room for the tiny index (3.6 MiB), not for a run beside it (the tests run as root, as
    CI does)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_full_keeps_previous_index_and_resumes(
    small_disk, tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, tiny_index, capsys
):
    out = small_disk / "index.duckdb"
    shutil.copy(tiny_index, out)  # the previous index, which a failed rebuild must not touch
    before = digest(out)
    args = cli(shard_dir, tiny_model_spec, tiny_sae_repo, out) + ["--fresh"]

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and str(small_disk) in err, err
    assert digest(out) == before

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(cli(shard_dir, tiny_model_spec, tiny_sae_repo, out)) == 0
    assert not (small_disk / "index.duckdb.work").exists()
    reference = tmp_path / "reference.duckdb"
    assert main(cli(shard_dir, tiny_model_spec, tiny_sae_repo, reference)) == 0
    assert index_contents(out) == index_contents(reference)


# ---------------------------------------------------------------- shards that fail while being read

import socket  # noqa: E402
import threading  # noqa: E402

import torch  # noqa: E402

from clipscope_explorer.precompute import shard_reader, sources  # noqa: E402
from tests.fixtures import write_shards  # noqa: E402


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(shard_reader, "RETRY_BACKOFF_S", 0.01)
    monkeypatch.setattr(shard_reader, "REMOTE_TIMEOUT_S", 1.0)


def batches(shards, **kwargs):
    dataset = sources.ShardBatches(shards, lambda image: torch.zeros(3, 2, 2), 4, thumb_size=16, **kwargs)
    return list(dataset)


def test_truncated_shard_keeps_what_was_read_and_is_reported(tmp_path, quick_retries):
    paths = write_shards(tmp_path, 2, 10)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) * 6 // 10])  # cut inside a later sample
    result = batches(sources.resolve_sources([str(tmp_path / "*.tar")]))
    failed = [b for b in result if b.failure]
    assert len(failed) == 1 and failed[0].shard == 0 and failed[0].shard_done
    assert "gave up after 4 attempts" in failed[0].failure and "00000.tar" in failed[0].failure
    read = [s.key for b in result if b.shard == 0 for s in b.samples]
    assert read == [f"00000{i:04d}" for i in range(len(read))] and 3 <= len(read) < 10
    assert len([s for b in result if b.shard == 1 for s in b.samples]) == 10  # the next shard is unharmed


def test_shard_cut_at_a_member_boundary_is_caught_by_its_stats_file(tmp_path, quick_retries):
    import tarfile

    paths = write_shards(tmp_path, 1, 10)
    with tarfile.open(paths[0]) as tar:
        cut = tar.getmembers()[12].offset  # the header of the fifth sample's first member
    paths[0].write_bytes(paths[0].read_bytes()[:cut])
    result = batches(sources.resolve_sources([str(paths[0])]))
    assert sum(len(b.samples) for b in result) == 4
    assert "truncated, 4 of the 10 samples its stats file lists" in result[-1].failure


def test_shard_that_disappears_mid_run_is_skipped_and_reported(tmp_path, quick_retries):
    paths = write_shards(tmp_path, 3, 5)
    shards = sources.resolve_sources([str(tmp_path / "*.tar")])
    paths[1].unlink()  # gone after the sources were checked
    result = batches(shards)
    assert [b.shard for b in result if b.failure] == [1]
    assert "FileNotFoundError" in next(b.failure for b in result if b.failure)
    assert sum(len(b.samples) for b in result) == 10


def test_folder_file_that_disappears_is_one_skipped_sample(tmp_path, quick_retries):
    from tests.fixtures import write_folder

    write_folder(tmp_path / "imgs", 5)
    shards = sources.resolve_sources([str(tmp_path / "imgs")])
    (tmp_path / "imgs" / "a" / "img001.png").unlink()
    result = batches(shards)
    skipped = [s for b in result for s in b.skipped]
    assert [(s.key, s.error) for s in skipped] == [("a/img001.png", "unreadable file: FileNotFoundError")]
    assert not any(b.failure for b in result)


def test_remote_shard_that_times_out_is_retried_then_reported(quick_retries):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_hang():  # answers nothing, ever: a stalled server
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_hang, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/00000.tar"
        result = batches(sources.resolve_sources([url]))
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert len(result) == 1 and result[0].failure and "gave up after 4 attempts" in result[0].failure
    assert len(accepted) >= 4  # at least one connection per attempt


def test_job_completes_and_reports_a_truncated_shard(tmp_path, quick_retries, tiny_model_spec, tiny_sae_repo):
    import json

    import duckdb

    from clipscope_explorer.precompute.job import run
    from tests.conftest import precompute_config

    paths = write_shards(tmp_path / "shards", 2, 10)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2 + 100])
    out = run(
        precompute_config(
            tmp_path / "shards",
            tiny_model_spec,
            tiny_sae_repo,
            tmp_path / "t.duckdb",
            images=[str(tmp_path / "shards" / "*.tar")],
        )
    )
    with duckdb.connect(str(out), read_only=True) as con:
        sample = json.loads(con.execute("SELECT value FROM meta WHERE key = 'sample'").fetchone()[0])
    assert [f["shard"] for f in sample["failed_shards"]] == [1]
    assert "00001.tar" in sample["failed_shards"][0]["reason"]
    assert 10 < sample["n_images"] < 20
