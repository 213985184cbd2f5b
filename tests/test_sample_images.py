"""Sample images by id: thumbnails from the index, the rest from their tar shard or image folder, read back from
indexes built by the real precompute job and compared with an independent read of the same bytes."""

from __future__ import annotations

import functools
import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from clipscope_explorer.precompute.evaluate import sample_images
from clipscope_explorer.precompute.evaluate.sample_images import SampleImageError, SampleImages
from tests.conftest import precompute_config
from tests.fixtures import jpeg, shape_image, write_folder


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def unshown_copy(index: Path, folder: Path) -> Path:
    """A copy of the index in which the odd sample ids have no thumbnail (no feature shows them)."""
    copy = Path(shutil.copy(index, folder / "index.duckdb"))
    with duckdb.connect(str(copy)) as con:
        con.execute("DELETE FROM images WHERE image_id % 2 = 1")
    return copy


def rows(index: Path, table: str = "samples") -> list[tuple]:
    with duckdb.connect(str(index), read_only=True) as con:
        return con.execute(f"SELECT image_id, source, key FROM {table} ORDER BY image_id").fetchall()


def member_bytes(shard: str, key: str) -> bytes:
    with tarfile.open(shard) as tar:
        return tar.extractfile(f"{key}.jpg").read()


@pytest.fixture(scope="module")
def shard_index(tiny_index, tmp_path_factory) -> Path:
    return unshown_copy(tiny_index, tmp_path_factory.mktemp("sample_images"))


@pytest.fixture(scope="module")
def folder_index(tmp_path_factory, tiny_model_spec, tiny_sae_repo) -> tuple[Path, Path]:
    """(index, its image folder): the real precompute job run on a folder of images in subfolders."""
    from clipscope_explorer.precompute.job import run

    root = tmp_path_factory.mktemp("folder_source")
    photos = write_folder(root / "photos", 6)
    config = precompute_config(root, tiny_model_spec, tiny_sae_repo, root / "built.duckdb", images=[str(photos)])
    return unshown_copy(run(config), root), photos


def test_shown_images_are_their_thumbnails(tiny_index):
    with duckdb.connect(str(tiny_index), read_only=True) as con:
        thumbnails = dict(con.execute("SELECT image_id, thumbnail FROM images").fetchall())
    with SampleImages(tiny_index) as images:
        got = images.images(sorted(thumbnails))
    for image_id, image in zip(sorted(thumbnails), got):
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), pixels(thumbnails[image_id]))


def test_other_samples_are_read_from_their_shard_scanned_once(shard_index):
    unshown = [row for row in rows(shard_index) if row[0] % 2 == 1]
    assert len({source for _, source, _ in unshown}) == 3
    with SampleImages(shard_index) as images:
        for image_id, source, key in unshown:
            assert source.endswith(".tar")
            assert np.array_equal(np.asarray(images.image(image_id)), pixels(member_bytes(source, key)))
        assert images.shards_scanned == 3
        images.images([image_id for image_id, _, _ in unshown])
        assert images.shards_scanned == 3  # member offsets kept: no rescan


def test_identities_are_the_recorded_source_and_key(shard_index):
    recorded = rows(shard_index)
    with SampleImages(shard_index) as images:
        assert images.identities([0, 5, 9999]) == {i: f"{s}/{k}" for i, s, k in recorded if i in (0, 5)}


def test_moved_shards_are_read_under_images_root(shard_index, tmp_path):
    (image_id, source, key) = next(row for row in rows(shard_index) if row[0] % 2 == 1)
    moved = tmp_path / "moved"
    shutil.copytree(Path(source).parent, moved)
    with SampleImages(shard_index, images_root=moved) as images:
        assert images.location(source) == str(moved / Path(source).name)
        assert np.array_equal(np.asarray(images.image(image_id)), pixels(member_bytes(source, key)))
    with SampleImages(shard_index, images_root=tmp_path / "nowhere") as images:
        with pytest.raises(SampleImageError) as error:
            images.image(image_id)
    message = str(error.value)
    assert f"sample image {image_id}" in message and source in message and key in message
    assert str(tmp_path / "nowhere" / Path(source).name) in message and "does not exist" in message
    with SampleImages(shard_index, images_root=tmp_path / "nowhere") as images:
        assert images.image(image_id - 1).size  # shown: its thumbnail, wherever the shards are


def test_a_folder_index_reads_its_files_and_follows_a_move(folder_index, tmp_path):
    index, photos = folder_index
    unshown = [row for row in rows(index) if row[0] % 2 == 1]
    assert unshown and all(source == str(photos) for _, source, _ in unshown)
    assert any("/" in key for _, _, key in unshown)  # keys are paths relative to the folder
    expected = {image_id: np.asarray(Image.open(photos / key).convert("RGB")) for image_id, _, key in unshown}
    with SampleImages(index) as images:
        for image_id, image in zip(expected, images.images(list(expected))):
            assert np.array_equal(np.asarray(image), expected[image_id])
    shutil.copytree(photos, tmp_path / "elsewhere" / "photos")
    shutil.copytree(photos, tmp_path / "renamed")
    for root in (tmp_path / "elsewhere", tmp_path / "renamed"):
        with SampleImages(index, images_root=root) as images:
            for image_id, image in zip(expected, images.images(list(expected))):
                assert np.array_equal(np.asarray(image), expected[image_id])
    with SampleImages(index, images_root=tmp_path / "empty") as images:
        with pytest.raises(SampleImageError, match="does not exist"):
            images.image(unshown[0][0])


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def written_shard(shard_index, tmp_path_factory) -> tuple[Path, Path, dict[str, Image.Image]]:
    """(index, shard, {key: image}): a shard with png, webp and nested members, captions, a directory, a key
    with no image and a corrupt image; the index's odd samples moved onto it."""
    folder = tmp_path_factory.mktemp("written_shard")
    shard = folder / "custom.tar"
    images = {key: shape_image(seed)[0] for seed, key in enumerate(("deep/k1", "k2", "k3"))}
    with tarfile.open(shard, "w") as tar:
        directory = tarfile.TarInfo("deep")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        add(tar, "deep/k1.png", png(images["deep/k1"]))
        add(tar, "deep/k1.txt", b"a caption")
        add(tar, "k2.webp", png(images["k2"], "WEBP"))
        add(tar, "k3.json", b"{}")
        add(tar, "k3.png", png(images["k3"]))
        add(tar, "k3.jpg", jpeg(shape_image(99)[0]))  # a jpg is preferred over a png of the same key
        add(tar, "k4.txt", b"no image")
        add(tar, "k5.jpg", b"\xff\xd8 not a jpeg")
    index = Path(shutil.copy(shard_index, folder / "index.duckdb"))
    with duckdb.connect(str(index)) as con:
        for image_id, key in zip((1, 3, 5, 7, 9), ("deep/k1", "k2", "k3", "k4", "k5")):
            con.execute("UPDATE samples SET source = ?, key = ? WHERE image_id = ?", [str(shard), key, image_id])
    return index, shard, images


def test_a_written_shard_gives_each_member_or_a_named_error(written_shard):
    index, shard, expected = written_shard
    with SampleImages(index) as images:
        assert np.array_equal(np.asarray(images.image(1)), np.asarray(expected["deep/k1"]))
        assert np.array_equal(np.asarray(images.image(3)), pixels(png(expected["k2"], "WEBP")))
        assert np.array_equal(np.asarray(images.image(5)), pixels(jpeg(shape_image(99)[0])))
        with pytest.raises(SampleImageError) as missing:
            images.image(7)
        with pytest.raises(SampleImageError) as corrupt:
            images.image(9)
        with pytest.raises(SampleImageError, match="sample image 123456 .*no such image id"):
            images.image(123456)
        assert images.shards_scanned == 1
    assert str(missing.value).startswith(f"sample image 7 ({shard} : k4): KeyError")
    assert str(corrupt.value).startswith(f"sample image 9 ({shard} : k5): cannot decode it")


def test_a_remote_shard_is_read_over_http(written_shard, tmp_path):
    index, shard, expected = written_shard
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{shard.name}"
    remote = Path(shutil.copy(index, tmp_path / "remote.duckdb"))
    with duckdb.connect(str(remote)) as con:
        con.execute("UPDATE samples SET source = ? WHERE source = ?", [url, str(shard)])
    try:
        with SampleImages(remote) as images:
            assert np.array_equal(np.asarray(images.image(1)), np.asarray(expected["deep/k1"]))
            assert np.array_equal(np.asarray(images.image(3)), pixels(png(expected["k2"], "WEBP")))
            assert images.shards_scanned == 1
    finally:
        server.shutdown()


def test_it_opens_beside_another_connection_of_any_configuration(tiny_index):
    with duckdb.connect(str(tiny_index), read_only=True, config={"threads": 2}) as con:
        with SampleImages(tiny_index) as images:
            assert images.image(0).size
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] > 0


def test_threads_read_at_once_and_scan_each_shard_once(shard_index):
    ids = [row[0] for row in rows(shard_index)]
    with SampleImages(shard_index) as images:
        expected = [np.asarray(image) for image in images.images(ids)]
    results: dict[int, list] = {}
    with SampleImages(shard_index) as images:

        def read(n: int) -> None:
            results[n] = [np.asarray(image) for image in images.images(ids[n:] + ids[:n])]

        threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert images.shards_scanned == 3
    assert sorted(results) == [0, 1, 2, 3]
    for n, got in results.items():
        assert all(np.array_equal(a, b) for a, b in zip(got, expected[n:] + expected[:n]))


def test_shards_listed_are_bounded(shard_index, monkeypatch):
    monkeypatch.setattr(sample_images, "CACHED_SHARDS", 1)
    unshown = [row for row in rows(shard_index) if row[0] % 2 == 1]
    first_of_each = {source: image_id for image_id, source, _ in reversed(unshown)}
    with SampleImages(shard_index) as images:
        for image_id in list(first_of_each.values()) * 2:
            images.image(image_id)
        assert images.shards_scanned == 6  # one shard kept: each read of another rescans
