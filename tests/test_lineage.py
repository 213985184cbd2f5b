"""Lineage across layers (precompute/evaluate/lineage.py, `clipscope-explorer lineage`): the links equal a
brute-force count over the images (Python loops, the score from its formula) on a synthetic sample, on the
precompute job's own index and on the page tests' index; a planted relation comes out on top; the minimum
support holds whatever the block size; bad input is one line and writes nothing."""

from __future__ import annotations

import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pytest

from clipscope_explorer.cli import main
from clipscope_explorer.precompute.evaluate.lineage import Occurrences, occurrences_from_codes, pair_links
from clipscope_explorer.precompute.evaluate.lineage_run import LineageOptions, lineage
from tests.app.conftest import build_index

Sets = dict[int, set[int]]  # image -> the features occurring on it


def brute_force(a: Sets, b: Sets, n_images: int, links: int, min_support: int) -> dict[tuple[int, int], tuple]:
    """(feature, other) -> (score, support) of each feature's `links` best links (npmi > 0), counted image
    by image."""
    count_a = Counter(f for features in a.values() for f in features)
    count_b = Counter(f for features in b.values() for f in features)
    both: Counter = Counter()
    for image, features in a.items():
        for fa in features:
            for fb in b.get(image, ()):
                both[fa, fb] += 1
    scored = defaultdict(list)
    for (fa, fb), c in both.items():
        if c >= min_support:
            pmi = math.log(c * n_images / (count_a[fa] * count_b[fb]))
            score = 1.0 if c == n_images else pmi / -math.log(c / n_images)
            if score > 0:
                scored[fa].append((score, fb, c))
    return {
        (fa, fb): (score, c)
        for fa, items in scored.items()
        for score, fb, c in sorted(items, key=lambda t: (-round(t[0], 12), t[1]))[:links]
    }


def as_dict(links) -> dict[tuple[int, int], tuple]:
    return {
        (int(f), int(o)): (float(s), int(c))
        for f, o, s, c in zip(links.feature, links.other, links.score, links.support)
    }


def assert_same(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for key, (score, support) in expected.items():
        assert found[key][1] == support, key
        assert found[key][0] == pytest.approx(score, rel=1e-12, abs=1e-12), key


def synthetic(n_images=300, n_features=40, k=6, seed=0):
    """Codes of two layers: random kept latents, some not firing (value <= 0); feature 7 of the first
    layer and 11 of the second are planted on the same images (and fire nowhere else)."""
    rng = np.random.default_rng(seed)
    codes = {}
    for layer in (0, 1):
        indices = np.stack([rng.choice(np.arange(12, n_features), k, replace=False) for _ in range(n_images)])
        values = rng.normal(1.0, 1.0, (n_images, k)).astype(np.float32)
        codes[layer] = [indices, values]
    planted = rng.random(n_images) < 0.2
    for layer, feature in ((0, 7), (1, 11)):
        codes[layer][0][planted, 0] = feature
        codes[layer][1][planted, 0] = 5.0
    return codes, n_images, n_features


def occurrences(indices, values, n_images, n_features) -> tuple[Occurrences, Sets]:
    offsets = np.arange(0, indices.size + 1, indices.shape[1])
    found = occurrences_from_codes(
        np.arange(n_images), offsets, indices.reshape(-1), values.reshape(-1), n_images, n_features
    )
    sets = {i: {int(f) for f, v in zip(indices[i], values[i]) if v > 0} for i in range(n_images)}
    return found, sets


@pytest.mark.parametrize("block_work", [1, 50, 10**9])
def test_links_equal_brute_force_and_the_planted_pair_comes_first(block_work):
    codes, n, f = synthetic()
    (a, sets_a), (b, sets_b) = (occurrences(*codes[layer], n, f) for layer in (0, 1))
    forward, backward = pair_links(a, b, 3, 3, block_work=block_work)
    assert_same(as_dict(forward), brute_force(sets_a, sets_b, n, 3, 3))
    assert_same(as_dict(backward), brute_force(sets_b, sets_a, n, 3, 3))
    assert (forward.other[forward.feature == 7][0], forward.score[forward.feature == 7][0]) == (11, 1.0)
    assert (backward.other[backward.feature == 11][0], backward.score[backward.feature == 11][0]) == (7, 1.0)
    assert forward.support.min() >= 3 and backward.support.min() >= 3


def test_minimum_support_drops_a_perfect_pair_on_too_few_images():
    """Two features that fire together on exactly 2 images (and nowhere else) score 1, yet need support 3."""
    codes, n, f = synthetic()
    for layer, feature in ((0, 8), (1, 9)):
        codes[layer][0][:2, 1] = feature
        codes[layer][1][:2, 1] = 4.0
    (a, sets_a), (b, _) = (occurrences(*codes[layer], n, f) for layer in (0, 1))
    assert sets_a[0] >= {8}
    for min_support, present in ((2, True), (3, False)):
        forward, _ = pair_links(a, b, 5, min_support)
        assert (9 in forward.other[forward.feature == 8]) is present
        assert forward.support.min() >= min_support


def _index_sets(path: Path, layers: list[int]) -> tuple[int, dict[str, dict[int, Sets]]]:
    """Per source and layer, each sample image's occurring features, read from the file independently."""
    with duckdb.connect(str(path), read_only=True) as con:
        n_images = con.execute("SELECT count(*) FROM samples").fetchall()[0][0]
        found: dict[str, dict[int, Sets]] = {"cls": {}, "top_images": {}}
        for layer in layers:
            cls: Sets = {}
            for image, indices, values in con.execute(
                "SELECT image_id, indices, activations FROM sample_codes WHERE layer = ?", [layer]
            ).fetchall():
                cls[image] = {f for f, v in zip(indices, values) if v > 0}
            top: Sets = defaultdict(set)
            for feature, image in con.execute(
                "SELECT feature, image_id FROM examples WHERE layer = ? AND kind = 'top'", [layer]
            ).fetchall():
                top[image].add(feature)
            found["cls"][layer], found["top_images"][layer] = cls, dict(top)
    return n_images, found


def assert_table_is_brute_force(path: Path, links: int = 5, min_support: int = 3, min_shared: int = 2) -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        layers = sorted(row[0] for row in con.execute("SELECT layer FROM layers").fetchall())
        rows = con.execute("SELECT layer, feature, other_layer, other_feature, source, score, support FROM lineage")
        table = rows.fetchall()
    n_images, sets = _index_sets(path, layers)
    checked = 0
    for source, minimum in (("cls", min_support), ("top_images", min_shared)):
        for layer in layers:
            for other in layers:
                if other == layer:
                    continue
                found = {
                    (f, o): (s, c) for lay, f, ol, o, src, s, c in table if (lay, ol, src) == (layer, other, source)
                }
                expected = brute_force(sets[source][layer], sets[source][other], n_images, links, minimum)
                assert_same(found, expected)
                checked += len(expected)
    assert checked == len(table)
    return checked


def test_the_precompute_jobs_index(tiny_index, tmp_path):
    options = LineageOptions(index=tiny_index, out=tmp_path / "lineage.duckdb", processes=1, progress=False)
    out = lineage(options)  # here; the command's default runs the pairs in two processes
    assert assert_table_is_brute_force(out) > 0
    with duckdb.connect(str(out), read_only=True) as con:
        sources = {row[0] for row in con.execute("SELECT DISTINCT source FROM lineage").fetchall()}
        minor = con.execute("SELECT value FROM meta WHERE key = 'schema_minor'").fetchall()[0][0]
    assert sources == {"cls", "top_images"} and int(minor) >= 4


def test_the_page_tests_index_through_the_command(tmp_path, capsys):
    source = build_index(tmp_path / "index.duckdb")
    out = tmp_path / "copy.duckdb"
    assert main(["lineage", str(source), "--out", str(out), "--links", "3", "--min-support", "4", "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    assert assert_table_is_brute_force(out, links=3, min_support=4) > 0
    with duckdb.connect(str(source), read_only=True) as con:  # the source is untouched
        assert con.execute("SELECT count(*) FROM lineage").fetchall() == [(0,)]
    # a rerun on some layers replaces their rows, in place
    assert main(["lineage", str(out), "--layers", "11,20", "--links", "1", "--no-progress"]) == 0
    assert assert_table_is_brute_force(out, links=1) > 0


def _fail(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("clipscope-explorer lineage: error: "), err
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    source = build_index(tmp_path / "index.duckdb")
    out = tmp_path / "out.duckdb"
    assert "not found" in _fail(["lineage", str(tmp_path / "missing.duckdb")], capsys)
    text = tmp_path / "notes.duckdb"
    text.write_text("not a database")
    assert str(text) in _fail(["lineage", str(text), "--out", str(out)], capsys)
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    assert str(empty) in _fail(["lineage", str(empty), "--out", str(out)], capsys)
    assert "no layer 99" in _fail(["lineage", str(source), "--layers", "11,99", "--out", str(out)], capsys)
    assert "only layer 11" in _fail(["lineage", str(source), "--layers", "11", "--out", str(out)], capsys)
    older = Path(shutil.copy(source, tmp_path / "older.duckdb"))
    with duckdb.connect(str(older)) as con:
        con.execute("DROP TABLE sample_codes")
    line = _fail(["lineage", str(older), "--out", str(out)], capsys)
    assert "no per-image CLS codes" in line and "clipscope-explorer precompute" in line
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_precompute_evaluate_writes_the_lineage(shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path):
    from clipscope_explorer.precompute.job import run
    from tests.conftest import precompute_config

    out = run(
        precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path / "evaluated.duckdb", evaluate=True)
    )
    assert assert_table_is_brute_force(out) > 0
