import functools
import http.server
import threading

import pytest
import torch

from clipscope_explorer.precompute.shard_reader import known_size
from clipscope_explorer.precompute.sources import ShardBatches, SourceError, expand_braces, resolve_sources
from tests.fixtures import write_folder, write_shards


def identity_preprocess(image):
    return torch.zeros(3, 4, 4)


def all_batches(shards, batch_size=4, **kwargs):
    return list(ShardBatches(shards, identity_preprocess, batch_size, thumb_size=32, **kwargs))


def test_brace_ranges_keep_zero_padding():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_globs_ranges_and_stats(tmp_path):
    write_shards(tmp_path, 3, 5)
    by_glob = resolve_sources([str(tmp_path / "*.tar")])
    by_range = resolve_sources([f"{tmp_path}/{{00000..00002}}.tar"])
    assert [s.location for s in by_glob] == [s.location for s in by_range]
    assert [s.index for s in by_range] == [0, 1, 2]
    assert known_size(by_range[0]) == 5


def test_tar_samples_keys_captions_urls_and_corrupt_members(tmp_path):
    write_shards(tmp_path, 2, 6, corrupt={2, 7})
    shards = resolve_sources([f"{tmp_path}/{{00000..00001}}.tar"])
    batches = all_batches(shards)
    good = [s for b in batches for s in b.samples]
    skipped = [s for b in batches for s in b.skipped]
    assert [s.key for s in skipped] == ["000000002", "000010001"]
    assert len(good) == 10
    first = good[0]
    assert first.key == "000000000" and first.caption.startswith("a ")
    assert first.url == "https://example.org/000000000.jpg" and (first.width, first.height) == (256, 224)
    assert [b.start for b in batches if b.shard == 0] == [0, 4]
    assert batches[1].shard_done and batches[1].end == 6
    ordinals = [o for b in batches for o in b.ordinals.tolist()]
    assert ordinals == [(int(s.key[:5]) << 32) | int(s.key[5:]) for s in good]


def test_resume_skips_done_shards_and_positions(tmp_path):
    write_shards(tmp_path, 2, 6)
    shards = resolve_sources([str(tmp_path / "*.tar")])
    batches = all_batches(shards, progress={1: 4}, done={0})
    assert [s.key for b in batches for s in b.samples] == ["000010004", "000010005"]


def test_folder_source_keys_are_relative_paths_with_captions(tmp_path):
    write_folder(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "notes.md").write_text("not an image")
    shards = resolve_sources([str(tmp_path / "imgs")])
    samples = [s for b in all_batches(shards) for s in b.samples]
    assert [s.key for s in samples] == sorted(s.key for s in samples)
    assert {s.key for s in samples} == {f"{'a' if i % 2 else 'b'}/img{i:03d}.png" for i in range(6)}
    captions = {s.key: s.caption for s in samples}
    assert captions["b/img000.png"] is None and captions["a/img001.png"].startswith("a ")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{dir}/missing.tar", "shard .*missing.tar does not exist"),
        ("{dir}/nothing-*.tar", "no files match"),
        ("{dir}/file.txt", "neither a .tar shard nor an image folder"),
        ("{dir}/empty", "holds no images"),
    ],
)
def test_bad_sources_named_before_compute(tmp_path, spec, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=message):
        resolve_sources([spec.format(dir=tmp_path)])


def test_remote_http_shard_is_streamed(tmp_path):
    write_shards(tmp_path, 1, 4)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/00000.tar"
        shards = resolve_sources([url])
        samples = [s for b in all_batches(shards) for s in b.samples]
    finally:
        server.shutdown()
    assert [s.key for s in samples] == [f"00000{i:04d}" for i in range(4)]
    assert all(s.source == url for s in samples)
