"""The offline demo: its features must be recognisable, measured against the generator's ground truth."""

import json
import os
from pathlib import Path

import duckdb
import pytest

from clipscope_explorer.precompute.demo.scenes import OBJECT_COLOURS, PLURALS, SHAPES

OBJECT_WORDS = set(OBJECT_COLOURS) | set(SHAPES) | set(PLURALS.values())
LOCALISATION_TARGET = 0.80


def localisation(index: Path, images: Path) -> dict[int, dict]:
    """Per layer: of the top examples of object-selective features (those whose most distinctive
    caption word names an object colour or shape), the fraction whose heatmap peak lies on a
    patch covered by an object in the generator's ground truth."""
    import numpy as np

    con = duckdb.connect(str(index), read_only=True)
    rows = con.execute(
        "SELECT e.layer, e.feature, i.key, e.heatmap FROM examples e JOIN images i USING (image_id) "
        "JOIN features f USING (layer, feature) WHERE e.kind = 'top' AND len(f.label_terms) > 0 "
        "AND list_extract(f.label_terms, 1) IN (SELECT unnest(?)) ORDER BY ALL",
        [sorted(OBJECT_WORDS)],
    ).fetchall()
    con.close()
    result: dict[int, dict] = {}
    for layer, feature, key, heat in rows:
        heatmap = np.frombuffer(heat, np.uint8)
        truth = json.loads((images / key).with_suffix(".json").read_text())
        covered = {p for obj in truth["objects"] for p in obj["patches"]}
        entry = result.setdefault(layer, {"features": set(), "examples": 0, "inside": 0})
        entry["features"].add(feature)
        entry["examples"] += 1
        entry["inside"] += int(heatmap.argmax()) in covered
    return {
        layer: {"features": len(e["features"]), "examples": e["examples"], "fraction": e["inside"] / e["examples"]}
        for layer, e in result.items()
    }


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory):
    """The demo exactly as `clipscope-explorer demo` builds it (2,000 images)."""
    from clipscope_explorer.precompute.demo.build import build_demo

    data = tmp_path_factory.mktemp("demo")
    return build_demo(data, 2000, progress=False), data / "images"


@pytest.mark.slow
def test_demo_features_localise_objects(demo_index):
    index, images = demo_index
    figures = localisation(index, images)
    report = "; ".join(
        f"layer {layer}: {f['fraction']:.1%} of {f['examples']} top examples of "
        f"{f['features']} object-selective features"
        for layer, f in sorted(figures.items())
    )
    print(f"\nDEMO LOCALISATION {report}")
    artifacts = Path(os.environ.get("CLIPSCOPE_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(exist_ok=True)
    (artifacts / "demo_localisation.json").write_text(json.dumps(figures, indent=2))
    assert set(figures) == {1, 3}
    for layer, f in figures.items():
        assert f["features"] >= 50, f"layer {layer}: too few object-selective features"
        assert f["fraction"] >= LOCALISATION_TARGET, report


def test_demo_index_says_it_is_a_demo(demo_index):
    con = duckdb.connect(str(demo_index[0]), read_only=True)
    assert json.loads(con.execute("SELECT value FROM meta WHERE key = 'demo'").fetchone()[0]) is True
    n_images = con.execute("SELECT n_images FROM layers WHERE layer = 1").fetchone()[0]
    assert n_images == 2000
