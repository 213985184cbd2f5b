"""Interventions on an upload (`POST /api/intervene`, `/uploads/{id}/interventions/{id}`) on the tiny CLIP
and SAEs, against an independent run: open_clip's own forward pass with hooks that make the edit and read
the stream, and the SAE's released forward pass written out densely from the checkpoint file."""

from __future__ import annotations

import io

import duckdb
import numpy as np
import pytest
import torch
from PIL import Image

from tests.app.test_live import image, upload
from tests.conftest import TINY_LAYERS

EDITED, DEEPER = TINY_LAYERS


@pytest.fixture(scope="module")
def reference(tiny_model_spec, tiny_sae_repo):
    """open_clip's tiny CLIP with hooks: `run(data, edit)` gives the dense firing values [T, F] of every
    TINY_LAYER and the final embedding, with `edit` = (layer, feature, scale, tokens or None) applied."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model_spec)
    model.eval()
    saes = {}
    for layer in TINY_LAYERS:
        blob = torch.load(tiny_sae_repo / f"{layer}_resid" / "2000.pt", weights_only=True)
        saes[layer] = (blob["model_state_dict"], int(blob["k"]))
    blocks = model.visual.transformer.resblocks
    batch_first = getattr(model.visual.transformer, "batch_first", True)

    def firing(x_td, layer):
        tensors, k = saes[layer]
        pre = (x_td - tensors["pre_b"]) @ tensors["enc"]
        top = torch.topk(pre, k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values).clamp(min=0)

    def run(data: bytes, edit=None):
        seen = {}

        def hook(layer):
            def after_block(module, inputs, output):
                x = output if batch_first else output.transpose(0, 1)
                if edit is not None and edit[0] == layer:
                    _, feature, scale, tokens = edit
                    a = firing(x[0], layer)[:, feature]
                    keep = torch.zeros_like(a, dtype=torch.bool)
                    keep[list(range(len(a))) if tokens is None else list(tokens)] = True
                    x = x.clone()
                    x[0, keep] += (scale - 1) * a[keep, None] * saes[layer][0]["dec"][feature]
                seen[layer] = firing(x[0], layer)
                return x if batch_first else x.transpose(0, 1)

            return after_block

        handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in TINY_LAYERS]
        try:
            with Image.open(io.BytesIO(data)) as picture, torch.inference_mode():
                embedding = model.encode_image(preprocess(picture.convert("RGB"))[None], normalize=True)[0]
        finally:
            for handle in handles:
                handle.remove()
        return seen, embedding.double().numpy()

    return run


@pytest.fixture(scope="module")
def vocabulary(tiny_index):  # the app serves a copy
    with duckdb.connect(str(tiny_index), read_only=True) as con:
        rows = con.execute("SELECT term, embedding FROM vocabulary").fetchall()
    return {term: np.frombuffer(blob, dtype="<f2").astype(np.float64) for term, blob in rows}


def intervene(client, path="/api/intervene", files=None, **fields):
    return client.post(path, data={k: str(v) for k, v in fields.items()}, files=files)


def busiest_feature(client, data: bytes, layer: int, fewest: int = 3, **fields) -> int:
    """A feature firing on at least `fewest` patches of the image at `layer`, on as few as possible."""
    result = upload(client, data, patches="true", **fields).json()
    counts = {}
    for hits in result["layers"][str(layer)]["patches"]:
        for feature, _ in hits:
            counts[feature] = counts.get(feature, 0) + 1
    return min((n, f) for f, n in counts.items() if n >= fewest)[1]


@pytest.fixture(scope="module")
def photo(live_client):
    data = image(21)
    return data, upload(live_client, data).json()


def test_scale_one_changes_nothing_at_all(live_client, photo):
    data, uploaded = photo
    feature = busiest_feature(live_client, data, EDITED)
    result = intervene(live_client, upload_id=uploaded["upload_id"], layer=EDITED, feature=feature, scale=1).json()
    assert result["scale"] == 1.0 and result["patches"] is None
    assert result["layers"][str(DEEPER)]["changed"] == 0 and result["layers"][str(DEEPER)]["changes"] == []
    assert result["edited"]["before"] == result["edited"]["after"] > 0
    assert result["edited"]["heatmap_before"] == result["edited"]["heatmap_after"]
    assert result["prompts"] and all(p["before"] == p["after"] for p in result["prompts"])
    assert "the scale is 1" in result["note"]
    shown = {f["feature"]: f for f in uploaded["layers"][str(EDITED)]["features"]}
    if feature in shown:  # the unedited side is the upload's own result
        assert result["edited"]["before"] == shown[feature]["activation"]


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_an_edit_matches_open_clip_with_the_edit_made_by_hand(live_client, photo, reference, vocabulary, scale):
    data, uploaded = photo
    feature = busiest_feature(live_client, data, EDITED)
    result = intervene(live_client, upload_id=uploaded["upload_id"], layer=EDITED, feature=feature, scale=scale)
    assert result.status_code == 200, result.text
    result = result.json()
    plain, plain_embedding = reference(data)
    edited, edited_embedding = reference(data, (EDITED, feature, scale, None))
    np.testing.assert_allclose(result["edited"]["before"], plain[EDITED][:, feature].max(), rtol=1e-5)
    np.testing.assert_allclose(result["edited"]["heatmap_before"], plain[EDITED][1:, feature], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result["edited"]["after"], edited[EDITED][:, feature].max(), rtol=1e-4, atol=1e-6)
    layer = result["layers"][str(DEEPER)]
    before, after = plain[DEEPER].max(0).values, edited[DEEPER].max(0).values
    delta = (after - before).abs()
    assert 20 <= len(layer["changes"]) <= layer["changed"]
    np.testing.assert_allclose(
        abs(layer["changes"][0]["after"] - layer["changes"][0]["before"]), delta.max(), rtol=1e-4
    )
    moves = [abs(c["after"] - c["before"]) for c in layer["changes"]]
    assert all(a >= b - 1e-6 for a, b in zip(moves, moves[1:]))  # by |after - before| (of 7-digit values)
    for change in layer["changes"]:
        f = change["feature"]
        np.testing.assert_allclose([change["before"], change["after"]], [before[f], after[f]], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(change["heatmap_after"], edited[DEEPER][1:, f], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(change["heatmap_before"], plain[DEEPER][1:, f], rtol=1e-4, atol=1e-5)
        assert change["url"] == f"/layers/{DEEPER}/features/{f}"
    labels = [z["text"] for z in uploaded["zero_shot_labels"]]
    assert [p["text"] for p in result["prompts"]] == labels and labels  # default: the zero-shot labels
    for scored in result["prompts"]:
        vector = vocabulary[scored["text"]] / np.linalg.norm(vocabulary[scored["text"]])
        np.testing.assert_allclose(scored["before"], plain_embedding @ vector, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(scored["after"], edited_embedding @ vector, rtol=1e-4, atol=1e-5)


def test_an_edit_of_some_patches_leaves_the_other_tokens_exactly(live_client, photo, reference):
    data, uploaded = photo
    feature = busiest_feature(live_client, data, EDITED)
    before = np.array(
        intervene(live_client, upload_id=uploaded["upload_id"], layer=EDITED, feature=feature, scale=1).json()[
            "edited"
        ]["heatmap_before"]
    )
    firing = [p for p in range(len(before)) if before[p] > 0]
    chosen = firing[:2]
    result = intervene(
        live_client,
        upload_id=uploaded["upload_id"],
        layer=EDITED,
        feature=feature,
        scale=0,
        patches=",".join(map(str, reversed(chosen))),
    ).json()
    assert result["patches"] == sorted(chosen)
    assert result["edited"]["tokens"] == 2 and result["edited"]["tokens_changed"] == 2
    after = np.array(result["edited"]["heatmap_after"])
    others = [p for p in range(len(before)) if p not in chosen]
    assert (after[others] == before[others]).all()  # the stream there is untouched: its code too
    assert (after[chosen] < before[chosen]).all()
    edited, _ = reference(data, (EDITED, feature, 0.0, tuple(p + 1 for p in chosen)))
    np.testing.assert_allclose(after, edited[EDITED][1:, feature], rtol=1e-4, atol=1e-6)
    assert result["layers"][str(DEEPER)]["changed"] > 0  # attention carries the edit to every token


def test_results_have_a_permalink_and_are_not_computed_twice(live_client, photo):
    data, uploaded = photo
    feature = busiest_feature(live_client, data, EDITED)
    fields = dict(upload_id=uploaded["upload_id"], layer=EDITED, feature=feature, scale=2, prompts="red\nsquare things")
    first = intervene(live_client, **fields).json()
    batches = live_client.app.state.live.encoder.batcher.batches
    again = intervene(live_client, **fields).json()
    assert again == first and live_client.app.state.live.encoder.batcher.batches == batches
    assert first["url"] == f"/uploads/{uploaded['upload_id']}/interventions/{first['intervention_id']}"
    assert live_client.get("/api/upload").json()["live"]["interventions"] is True
    assert live_client.get(first["json_url"]).json() == first
    page = live_client.get(first["url"])
    assert page.status_code == 200 and f"Feature {feature} at layer {EDITED}, scaled by 2" in page.text
    assert 'type="application/json"' in page.text and first["upload_url"] in page.text
    assert [p["text"] for p in first["prompts"]] == ["red", "square things"]
    assert (
        first["prompts"][1]["before"] is None and "need CLIP's text tower" in first["prompts_note"]
    )  # not in the vocabulary
    other = intervene(live_client, **{**fields, "scale": 2.5}).json()
    assert other["intervention_id"] != first["intervention_id"]
    assert live_client.get(f"/api/uploads/{uploaded['upload_id']}/interventions/{'0' * 32}").status_code == 404


def test_a_new_image_is_uploaded_and_edited_in_one_request(live_client, photo):
    data = image(22)
    feature = busiest_feature(live_client, data, EDITED)
    by_file = intervene(live_client, files={"file": ("x.jpg", data, "image/jpeg")}, layer=EDITED, feature=feature)
    assert by_file.status_code == 200, by_file.text
    result = by_file.json()
    assert result["upload_id"] == upload(live_client, data).json()["upload_id"]
    by_id = intervene(live_client, upload_id=result["upload_id"], layer=EDITED, feature=feature).json()
    assert by_id == result


def test_a_feature_that_does_not_fire_is_a_no_op(live_client, photo):
    data, uploaded = photo
    fired = {
        f
        for hits in upload(live_client, data, patches="true").json()["layers"][str(EDITED)]["patches"]
        for f, _ in hits
    }
    cls = {f["feature"] for f in uploaded["layers"][str(EDITED)]["features"] if f["cls_activation"] > 0}
    silent = min(set(range(256)) - fired - cls)
    result = intervene(live_client, upload_id=uploaded["upload_id"], layer=EDITED, feature=silent, scale=0).json()
    assert result["edited"]["tokens_changed"] == 0 and result["edited"]["before"] == 0
    assert "does not fire on the chosen tokens" in result["note"]
    assert result["layers"][str(DEEPER)]["changes"] == []


def test_fewer_layers_uploaded_are_encoded_when_edited(live_client):
    data = image(23)
    feature = busiest_feature(live_client, data, EDITED, layers=str(EDITED))
    uploaded = upload(live_client, data, layers=str(EDITED)).json()
    assert list(uploaded["layers"]) == [str(EDITED)]
    result = intervene(live_client, upload_id=uploaded["upload_id"], layer=EDITED, feature=feature).json()
    assert result["layers"][str(DEEPER)]["changed"] > 0
    stored = live_client.get(f"/api/uploads/{uploaded['upload_id']}").json()
    assert sorted(stored["layers"]) == [str(EDITED), str(DEEPER)]


def test_editing_the_last_layer_shows_only_clips_view(live_client, photo):
    data, uploaded = photo
    feature = busiest_feature(live_client, data, DEEPER)
    result = intervene(live_client, upload_id=uploaded["upload_id"], layer=DEEPER, feature=feature, scale=0).json()
    assert result["layers"] == {} and result["prompts"]
    assert any(p["after"] != p["before"] for p in result["prompts"])
    fresh = image(27)  # a new image edited at the last layer in one request
    posted = intervene(live_client, files={"file": ("x.jpg", fresh, "image/jpeg")}, layer=DEEPER, feature=feature)
    assert posted.status_code == 200 and posted.json()["layers"] == {}


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"layer": 3}, 422, "layer 3 cannot be edited here; layers: 1, 2"),
        ({"layer": "one"}, 422, "layer must be a whole number"),
        ({"layer": None}, 422, "layer is missing"),
        ({"feature": 256}, 422, "feature 256 does not exist at layer 1: features are 0..255"),
        ({"feature": -1}, 422, "feature must be a whole number"),
        ({"scale": 10.5}, 422, "scale must be a number in [-10, 10]"),
        ({"scale": "abc"}, 422, "scale must be a number in [-10, 10], not 'abc'"),
        ({"scale": "nan"}, 422, "scale must be a number"),
        ({"scale": "-inf"}, 422, "scale must be a number"),
        ({"scale": "1e400"}, 422, "scale must be a number"),
        ({"patches": ""}, 422, "patches is empty"),
        ({"patches": " , "}, 422, "patches is empty"),
        ({"patches": "3,256"}, 422, "patches: '256' is not a patch index in 0..255"),
        ({"patches": "1;2"}, 422, "is not a patch index"),
        ({"prompts": "\n".join(["a"] * 17)}, 422, "prompts: at most 16"),
        ({"prompts": "x" * 201}, 422, "each at most 200 characters"),
        ({"template": "no braces"}, 422, "template: a template must contain exactly one {}"),
        ({"top": 0}, 422, "top must be in 1..200"),
        ({"upload_id": "../../etc/passwd"}, 422, "upload_id must be the 32 hex digits"),
        ({"upload_id": "f" * 32}, 404, "this upload is not stored here"),
        ({"upload_id": None}, 422, "give upload_id (a stored upload) or file"),
    ],
)
def test_bad_input_is_a_clear_4xx(live_client, photo, fields, status, message):
    form = {"upload_id": photo[1]["upload_id"], "layer": EDITED, "feature": 0, **fields}
    response = intervene(live_client, **{k: v for k, v in form.items() if v is not None})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail


def test_both_a_file_and_an_upload_id_or_no_form_are_refused(live_client, photo):
    both = intervene(
        live_client,
        files={"file": ("x.jpg", photo[0], "image/jpeg")},
        upload_id=photo[1]["upload_id"],
        layer=EDITED,
        feature=0,
    )
    assert both.status_code == 422 and "not both" in both.json()["detail"]
    raw = live_client.post("/api/intervene", content=b"{}", headers={"content-type": "application/json"})
    assert raw.status_code == 415
    broken = intervene(live_client, files={"file": ("x.jpg", b"not an image", "image/jpeg")}, layer=EDITED, feature=0)
    assert broken.status_code in (400, 415) and broken.json()["detail"]


def test_the_result_page_offers_the_form_and_the_form_works_without_script(live_client, photo):
    data, uploaded = photo
    page = live_client.get(uploaded["url"]).text
    assert 'class="intervene-form"' in page and f'name="upload_id" value="{uploaded["upload_id"]}"' in page
    assert 'class="edit-feature" data-layer="2" hidden' in page
    feature = busiest_feature(live_client, data, EDITED)
    form = {
        "upload_id": uploaded["upload_id"],
        "layer": EDITED,
        "feature": feature,
        "scale": "0",
        "patches": "",
        "prompts": "",
    }
    posted = live_client.post("/intervene", data=form)  # url-encoded, as a browser sends it; empty patches: all
    assert posted.status_code == 303
    api = intervene(live_client, upload_id=uploaded["upload_id"], layer=EDITED, feature=feature, scale=0).json()
    assert posted.headers["location"] == api["url"]
    fragment = live_client.post("/intervene", data=form, headers={"HX-Request": "true", "HX-Target": "intervention"})
    assert fragment.status_code == 200 and fragment.headers["HX-Push-Url"] == api["url"]
    assert "<html" not in fragment.text and 'class="intervention-result"' in fragment.text
    bad = live_client.post(
        "/intervene", data={**form, "scale": "11"}, headers={"HX-Request": "true", "HX-Target": "intervention"}
    )
    assert bad.status_code == 422 and "Could not run this intervention: scale must be" in bad.text
    page_error = live_client.post("/intervene", data={**form, "scale": "11"})
    assert page_error.status_code == 422 and "<html" in page_error.text


def test_no_interventions_keeps_the_lean_worker(live_index, tmp_path):
    from tests.app.conftest import live_app_client, wait_live

    with live_app_client(live_index, tmp_path / "store", interventions=False) as client:
        wait_live(client)
        assert client.app.state.live.encoder.decoders == {}
        assert client.get("/api/upload").json()["live"]["interventions"] is False
        data = image(24)
        uploaded = upload(client, data).json()
        assert uploaded["interventions"] is False
        assert 'class="intervene-form"' not in client.get(uploaded["url"]).text
        refused = intervene(client, upload_id=uploaded["upload_id"], layer=EDITED, feature=0)
        assert refused.status_code == 503 and "--no-interventions" in refused.json()["detail"]
    with live_app_client(live_index, tmp_path / "store") as client:  # the same store, interventions on
        wait_live(client)
        stale = intervene(client, upload_id=uploaded["upload_id"], layer=EDITED, feature=0)
        assert stale.status_code == 409 and "without its model input" in stale.json()["detail"]
        assert upload(client, data).json()["interventions"] is True  # uploaded again: kept with its input
        assert intervene(client, upload_id=uploaded["upload_id"], layer=EDITED, feature=0).status_code == 200


def test_the_upload_limits_apply(live_index, tmp_path, photo):
    from tests.app.conftest import live_app_client, wait_live

    with live_app_client(live_index, tmp_path / "store", upload_rate_limit=1, upload_rate_burst=1) as client:
        wait_live(client)
        data = image(25)
        first = intervene(client, files={"file": ("x.jpg", data, "image/jpeg")}, layer=EDITED, feature=0)
        assert first.status_code == 200
        second = intervene(client, upload_id=first.json()["upload_id"], layer=EDITED, feature=1)
        assert second.status_code == 429 and second.headers["Retry-After"]


def test_prompts_of_ones_own_go_through_clips_text_tower(live_index, tmp_path, reference, tiny_model_spec):
    import open_clip

    from tests.app.conftest import live_app_client, wait_live

    model = open_clip.create_model(tiny_model_spec).eval()
    tokenizer = open_clip.get_tokenizer(tiny_model_spec)
    with live_app_client(live_index, tmp_path / "store", text=True, search_cache=tmp_path / "cache") as client:
        wait_live(client)
        assert client.app.state.meaning.wait(120) and client.app.state.meaning.text_state == "ready"
        data = image(26)
        feature = busiest_feature(client, data, EDITED)
        prompts = ["a tilted blue square", "nothing at all"]
        result = intervene(
            client,
            files={"file": ("x.jpg", data, "image/jpeg")},
            layer=EDITED,
            feature=feature,
            scale=-2,
            prompts="\n".join(prompts),
            template="{} on a plain background",
        ).json()
    assert result["prompts_note"] is None and result["template"] == "{} on a plain background"
    _, plain = reference(data)
    _, edited = reference(data, (EDITED, feature, -2.0, None))
    for text, scored in zip(prompts, result["prompts"], strict=True):
        with torch.inference_mode():
            vector = model.encode_text(tokenizer([f"{text} on a plain background"]), normalize=True)[0].double().numpy()
        np.testing.assert_allclose(
            [scored["before"], scored["after"]], [plain @ vector, edited @ vector], rtol=1e-4, atol=1e-5
        )


def test_without_a_store_an_edit_has_no_link_and_a_full_disk_loses_only_the_link(live_index, live_client, monkeypatch):
    from tests.app.conftest import live_app_client, wait_live

    data = image(28)
    with live_app_client(live_index, None) as client:
        wait_live(client)
        result = intervene(client, files={"file": ("x.jpg", data, "image/jpeg")}, layer=EDITED, feature=0)
        assert result.status_code == 200 and result.json()["url"] is None and result.json()["upload_url"] is None
        assert result.json()["layers"][str(DEEPER)]["changed"] >= 0
        stale = intervene(client, upload_id=result.json()["upload_id"], layer=EDITED, feature=0)
        assert stale.status_code == 404

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(live_client.app.state.uploads, "save_edit", full_disk)
    uploaded = upload(live_client, data).json()
    edited = intervene(live_client, upload_id=uploaded["upload_id"], layer=EDITED, feature=1, scale=4)
    assert edited.status_code == 200 and edited.json()["url"] is None and edited.json()["layers"]
