"""Faults of the precompute job: a full disk loses nothing and resumes once space is freed."""

import hashlib
import shutil
import subprocess

import pytest

from app.cli import main
from tests.fixtures import index_contents


def cli(shard_dir, model_spec, sae, out):
    return ["precompute", "--images", f"{shard_dir}/{{00000..00002}}.tar", "--out", str(out), "--model",
            model_spec, "--sae", str(sae), "--layers", "1,2", "--top-n", "6", "--band-size", "2",
            "--batch-size", "8", "--device", "cpu", "--workers", "0", "--checkpoint-every", "8", "--no-progress"]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (the tests run as root, as CI does)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_full_keeps_previous_index_and_resumes(small_disk, tmp_path, shard_dir, tiny_model_spec,
                                                    tiny_sae_repo, tiny_index, capsys):
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
