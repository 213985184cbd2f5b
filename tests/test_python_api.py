"""The Python API (`clipscope_explorer.open_index`) against the real server over the same index file: each result
equals the JSON of the route whose data function it calls, field by field; its errors are the server's; its
objects render as cards; and docs/python.md runs as written."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipscope_explorer import open_index
from clipscope_explorer.app.index_file import IndexOpenError, check_index
from clipscope_explorer.app.main import create_app
from clipscope_explorer.app.pages.features import FeaturePage
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.index_api import NotInIndex, Unavailable
from tests.app.conftest import DEAD, N_FEATURES, build_index, live_app_client, wait_live

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "docs" / "python.md"
SAMPLE = [(20, 8), (20, 3), (11, 0), (20, min(DEAD)), (11, N_FEATURES - 1), (20, 9), (11, 33)]


@pytest.fixture(scope="module")
def index_file(tmp_path_factory) -> Path:
    return build_index(tmp_path_factory.mktemp("api_index") / "index.duckdb")


@pytest.fixture(scope="module")
def server(index_file, tmp_path_factory):
    settings = Settings(index=index_file, live=False, text=False, upload_store=tmp_path_factory.mktemp("uploads"))
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert client.app.state.meaning.wait(60)
        yield client


@pytest.fixture(scope="module")
def api(index_file, server):
    with open_index(index_file, text=False) as index:
        yield index


def json_of(model) -> dict:
    return model.model_dump(mode="json")


def assert_same_fields(ours: dict, theirs: dict, what: str) -> None:
    assert list(ours) == list(theirs), what
    for name in theirs:
        assert ours[name] == theirs[name], f"{what}: {name}"


# ---------------------------------------------------------------- the API equals the JSON


def test_layers_equal_the_layers_json(api, server):
    served = server.get("/api/layers").json()["layers"]
    assert [json_of(layer) for layer in api.layers] == served
    assert repr(api.layers[1]) == "<Layer 20: 64 features, L0 31.5, explained variance 0.7>"
    assert json_of(api.info) == server.get("/api").json()["index"]


@pytest.mark.parametrize("layer, feature", SAMPLE)
def test_feature_equals_the_feature_json(api, server, layer, feature):
    ours = api.feature(layer, feature)
    assert isinstance(ours, FeaturePage)
    served = server.get(f"/api/layers/{layer}/features/{feature}").json()
    assert_same_fields(json_of(ours), served, f"{layer}/{feature}")
    if served["top_images"]:
        first = ours.top_images[0]
        assert (first.key, first.activation, first.heatmap) == tuple(
            served["top_images"][0][name] for name in ("key", "activation", "heatmap")
        )


@pytest.mark.parametrize("layer, feature", SAMPLE)
def test_top_images_are_the_feature_json_rows(api, server, layer, feature):
    table = api.top_images(layer, feature)
    served = server.get(f"/api/layers/{layer}/features/{feature}").json()["top_images"]
    assert table.to_pylist() == served
    assert table.schema.field("image_id").type == "int64" and str(table.schema.field("heatmap").type) == (
        "list<item: double>"
    )


@pytest.mark.parametrize(
    "layer, filters",
    [
        (20, {}),
        (11, {"sort": "frequency", "order": "desc", "min_freq": 0}),
        (20, {"sort": "max_activation", "order": "asc", "max_freq": 0.02}),
        (20, {"q": "dog", "sort": "mean_activation", "order": "desc"}),
        (11, {"q": "no such words"}),
    ],
)
def test_features_are_the_layer_json_rows(api, server, layer, filters):
    table = api.features(layer, **filters)
    served = server.get(f"/api/layers/{layer}", params={**filters, "page_size": 200}).json()
    assert table.to_pylist() == served["features"]
    assert table.num_rows == served["paging"]["total"]
    assert table.column_names == list(served["features"][0]) if served["features"] else table.num_rows == 0
    limited = api.features(layer, **filters, limit=5)
    assert limited.to_pylist() == served["features"][:5]


@pytest.mark.parametrize(
    "params",
    [
        {"q": "dog"},
        {"q": "red car", "layer": 20},
        {"q": "sofa", "limit": 3, "by": "words"},
        {"q": "zzzz"},
        {"q": ""},
        {"q": "20/999"},
        {"q": "cat", "layer": 99},
    ],
)
def test_search_equals_the_search_json(api, server, params):
    served = server.get("/api/search", params=params).json()
    assert json_of(api.search(**params)) == served


def test_a_search_naming_a_feature_returns_it(api, server):
    location = server.get("/api/search", params={"q": "L20 F7"}).headers["location"]
    assert json_of(api.search("L20 F7")) == server.get(location).json()


def test_search_by_meaning_equals_the_search_json(tmp_path_factory, tiny_model_spec):
    """With a text tower that loads (the tiny CLIP, named by the index), the API searches by meaning by default."""
    folder = tmp_path_factory.mktemp("api_meaning")
    path = build_index(folder / "index.duckdb", model={"name": tiny_model_spec, "pretrained": None})
    settings = Settings(index=path, live=False, text=True, upload_store=folder / "uploads")
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert client.app.state.meaning.wait(120) and client.app.state.meaning.text_state == "ready"
        with open_index(path) as index:
            for params in (
                {"q": "dog"},
                {"q": "snowy mountain", "layer": 20, "limit": 5},
                {"q": "cat", "by": "meaning", "template": "a drawing of {}"},
            ):
                served = client.get("/api/search", params=params).json()
                assert served["by"] == "meaning" and served["meaning_results"], params
                assert json_of(index.search(**params)) == served


def test_search_by_meaning_where_it_cannot_run_says_why(api, server):
    served = server.get("/api/search", params={"q": "dog", "by": "meaning"})
    assert served.status_code == 503
    with pytest.raises(Unavailable) as error:
        api.search("dog", by="meaning")
    assert str(error.value) == served.json()["detail"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("layer, feature", [(20, N_FEATURES), (20, -1), (7, 0), (99999, 1)])
def test_unknown_layers_and_features_are_the_404s_message(api, server, layer, feature):
    with pytest.raises(KeyError) as error:
        api.feature(layer, feature)
    assert isinstance(error.value, NotInIndex)
    if layer >= 0 and feature >= 0:
        assert str(error.value) == server.get(f"/api/layers/{layer}/features/{feature}").json()["detail"]
    assert "\n" not in str(error.value) and str(error.value)[0] != "'"
    with pytest.raises(KeyError):
        api.top_images(layer, feature)


def test_bad_arguments_are_value_errors(api):
    with pytest.raises(KeyError, match="no layer 7"):
        api.features(7)
    for call in (
        lambda: api.feature("20", 1),
        lambda: api.feature(20, 1.5),
        lambda: api.feature(True, 1),
        lambda: api.features(20, sort="evil"),
        lambda: api.features(20, min_freq=2),
        lambda: api.features(20, limit=0),
        lambda: api.search("dog", by="telepathy"),
        lambda: api.search("x" * 500),
    ):
        with pytest.raises(ValueError):
            call()
    assert api.feature(np.int64(20), np.int32(8)).feature == 8
    with pytest.raises(ValueError, match="^open_index: device: String should match pattern"):
        open_index(api.path, device="gpu")


def _not_an_index(folder: Path) -> Path:
    path = folder / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
    return path


@pytest.mark.parametrize("case", ["missing", "folder", "corrupt", "empty", "not an index", "truncated"])
def test_open_index_refuses_what_serve_refuses_with_its_message(tmp_path, index_file, case):
    path = {
        "missing": lambda: tmp_path / "nowhere.duckdb",
        "folder": lambda: tmp_path,
        "corrupt": lambda: _write(tmp_path / "junk.duckdb", b"not a database" * 1000),
        "empty": lambda: _write(tmp_path / "empty.duckdb", b""),
        "not an index": lambda: _not_an_index(tmp_path),
        "truncated": lambda: _write(tmp_path / "cut.duckdb", index_file.read_bytes()[:20000]),
    }[case]()
    with pytest.raises(IndexOpenError) as served:
        check_index(path)  # what `serve` and `uvicorn ...:app` check before they start
    with pytest.raises(IndexOpenError) as ours:
        open_index(path)
    assert str(ours.value) == str(served.value) and "\n" not in str(ours.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_encode_says_clearly_when_the_model_cannot_load(index_file, server, tmp_path):
    with open_index(index_file, text=False, model=f"local-dir:{tmp_path / 'no-model'}") as index:
        with pytest.raises(Unavailable) as error:
            index.encode(b"not even an image")
    message = str(error.value)
    assert "could not be loaded" in message and "no-model" in message and "\n" not in message


def test_importing_the_package_stays_light():
    code = (
        "import sys, clipscope_explorer\n"
        "print(sorted(m for m in ('duckdb', 'fastapi', 'torch', 'pyarrow') if m in sys.modules))\n"
        "from clipscope_explorer import open_index\n"
        "print(open_index.__module__, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "clipscope_explorer.index_api False"]


# ---------------------------------------------------------------- rendering


def test_feature_card_is_self_contained(api, server):
    feature = api.feature(20, 8)
    html = feature._repr_html_()
    assert feature.label and feature.label in html and "Layer 20 · feature 8" in html
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) == 2 * len(feature.top_images) and all(s.startswith("data:image/") for s in sources)
    assert "http" not in html and "<script" not in html
    for example, thumbnail, overlay in zip(feature.top_images, sources[0::2], sources[1::2]):
        served = server.get(example.thumbnail_url).content
        assert base64.b64decode(thumbnail.removeprefix("data:image/jpeg;base64,")) == served
        drawn = Image.open(io.BytesIO(base64.b64decode(overlay.removeprefix("data:image/png;base64,"))))
        expected = Image.open(io.BytesIO(server.get(example.overlay_url).content))
        assert np.array_equal(np.asarray(drawn), np.asarray(expected)), example.image_id
    assert repr(feature) == '<Feature L20/8 "grey cat sleeping sofa" freq=0.0218>'


def test_dead_feature_card_and_link(index_file, server):
    with open_index(index_file, text=False, site_url="https://explorer.example.org/") as index:
        dead = index.feature(20, min(DEAD))
        assert repr(dead).endswith(" dead>") and "never fires" in dead._repr_html_()
        card = index.feature(11, 3)._repr_html_()
        assert 'href="https://explorer.example.org/layers/11/features/3" target="_blank"' in card


# ---------------------------------------------------------------- encoding (the precompute job's tiny index)


@pytest.fixture(scope="module")
def live_file(tiny_index, tmp_path_factory) -> Path:
    import shutil

    return Path(shutil.copy(tiny_index, tmp_path_factory.mktemp("api_live") / "tiny.duckdb"))


def test_encode_equals_the_upload_json(live_file, tmp_path):
    from tests import image_cases as cases

    data = cases.encode(cases.noisy((160, 120), seed=3), "JPEG")
    with live_app_client(live_file, None) as client:
        wait_live(client)
        assert client.app.state.meaning.wait(60)
        files = {"file": ("photo.jpg", data, "image/jpeg")}
        served = client.post("/api/encode", files=files, data={"layers": "2", "top": "5"}).json()
        served_all = client.post("/api/encode", files=files, data={"sort": "cls", "patches": "true"}).json()
        with open_index(live_file, text=False) as index:
            assert json_of(index.encode(data, layers=[2], top=5)) == served
            (tmp_path / "photo.jpg").write_bytes(data)
            assert json_of(index.encode(tmp_path / "photo.jpg", sort="cls", patches=True)) == served_all
            assert served["nearest_images"], "the tiny index has embeddings: the upload's neighbours are listed"
            picture = Image.open(io.BytesIO(data))
            png = io.BytesIO()
            picture.save(png, format="PNG")
            assert json_of(index.encode(picture, layers=[2])) == json_of(index.encode(png.getvalue(), layers=[2]))
            with pytest.raises(ValueError, match="layers: 7 not encoded here"):
                index.encode(data, layers=[7])
            with pytest.raises(ValueError):
                index.encode(b"GIF89a broken")


def test_intervene_equals_the_intervention_json(live_file):
    from tests import image_cases as cases

    data = cases.encode(cases.noisy((160, 120), seed=4), "JPEG")
    with live_app_client(live_file, None) as client:
        wait_live(client)
        assert client.app.state.meaning.wait(60)
        files = {"file": ("photo.jpg", data, "image/jpeg")}
        feature = client.post("/api/encode", files=files, data={"layers": "1"}).json()["layers"]["1"]["features"][0]
        form = {"layer": "1", "feature": str(feature["feature"]), "scale": "-2", "patches": "0,1,17"}
        served = client.post("/api/intervene", files=files, data=form).json()
        whole = {"layer": "1", "feature": str(feature["feature"])}  # scale 0 and every token: the defaults
        everywhere = client.post("/api/intervene", files=files, data=whole).json()
        with open_index(live_file, text=False) as index:
            assert json_of(index.intervene(data, 1, feature["feature"], scale=-2, patches=[17, 1, 0])) == served
            assert json_of(index.intervene(data, 1, feature["feature"])) == everywhere
            assert everywhere["layers"]["2"]["changes"] and everywhere["prompts"]
            with pytest.raises(ValueError, match="scale must be a number in"):
                index.intervene(data, 1, 0, scale=float("nan"))
            with pytest.raises(ValueError, match="layer 7 cannot be edited here"):
                index.intervene(data, 7, 0)


# ---------------------------------------------------------------- the walkthrough

BLOCK = re.compile(r"^(<!-- not run[^\n]*-->\n)?```(\w*)\n(.*?)^```\n", re.M | re.S)


def walkthrough() -> list[tuple[str, str, str | None]]:
    """docs/python.md's Python blocks in order: (code, 'run' or 'shown', the text block after it or None)."""
    blocks = [(skip, kind, body) for skip, kind, body in BLOCK.findall(WALKTHROUGH.read_text())]
    out = []
    for i, (skip, kind, body) in enumerate(blocks):
        if kind == "python":
            after = blocks[i + 1] if i + 1 < len(blocks) else None
            expected = after[2] if after and after[1] == "text" else None
            out.append((body, "shown" if skip else "run", expected))
    return out


def test_the_walkthrough_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing it runs may reach for weights
    build_index(tmp_path / "clipscope.duckdb")
    blocks = walkthrough()
    shown = [code for code, how, _ in blocks if how == "shown"]
    assert len(shown) == 3 and all(any(call in code for call in ("search(", "encode(", "intervene(")) for code in shown)
    assert all(expected is None for _, how, expected in blocks if how == "shown")
    namespace: dict = {}
    for code, how, expected in blocks:
        if how == "shown":
            compile(code, str(WALKTHROUGH), "exec")
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(WALKTHROUGH), "exec"), namespace)
        assert printed.getvalue() == (expected or ""), code
