"""Pages name the model, SAEs and image sources without the server's file-system paths, unless the operator
sets `show_local_paths`: every route is walked over an index that records absolute paths of this machine,
with live encoding failing on a missing `--live-sae` folder."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipscope_explorer.app.public_names import public_name, public_text
from tests.app.route_walk import endpoints, fill

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "spec, shown",
    [
        ("local-dir:/srv/models/tiny-clip", "local-dir:tiny-clip"),
        ("local-dir:/srv/models/tiny-clip/", "local-dir:tiny-clip"),
        ("local-dir:models/tiny-clip", "local-dir:models/tiny-clip"),
        ("hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K"),
        ("ViT-L-14", "ViT-L-14"),
        ("lewington/CLIP-ViT-L-scope", "lewington/CLIP-ViT-L-scope"),
        ("/home/me/.cache/huggingface/hub/snapshots/abc/20_resid/1200013184.pt", "20_resid/1200013184.pt"),
        ("/data/saes/scope", "scope"),
        ("~/saes/one.safetensors", "saes/one.safetensors"),
        ("/data/laion/{00000..00099}.tar", "laion/{00000..00099}.tar"),
        ("https://example.org/laion/00000.tar", "https://example.org/laion/00000.tar"),
        ("s3://bucket/laion/00000.tar", "s3://bucket/laion/00000.tar"),
        ("file:///data/laion/00000.tar", "laion/00000.tar"),
        ("shards/00000.tar", "shards/00000.tar"),
        ("C:\\models\\tiny-clip", "tiny-clip"),
        (None, None),
    ],
)
def test_public_name(spec, shown):
    assert public_name(spec) == shown


@pytest.mark.parametrize(
    "text, shown",
    [
        ("no SAE checkpoint in /srv/saes/missing for layer 1", "no SAE checkpoint in missing for layer 1"),
        (
            "[Errno 2] No such file or directory: '/srv/saes/1_resid/10.pt'",
            "[Errno 2] No such file or directory: '1_resid/10.pt'",
        ),
        ("cannot load local-dir:/srv/models/tiny: no config.", "cannot load local-dir:tiny: no config."),
        ("see https://example.org/a/b.pt, fp32/bf16 and 1/2", "see https://example.org/a/b.pt, fp32/bf16 and 1/2"),
    ],
)
def test_public_text(text, shown):
    assert public_text(text) == shown


@pytest.fixture(scope="module")
def local_index(index_path, tmp_path_factory) -> Path:
    """The test index, recording model, SAEs, sources and skipped images by absolute paths of this machine."""
    root = tmp_path_factory.mktemp("server-files")
    path = Path(shutil.copy(index_path, root / "index.duckdb"))
    con = duckdb.connect(str(path))
    for key, value in (
        ("model", {"name": f"local-dir:{root}/models/tiny-clip", "pretrained": None}),
        ("sae", {"source": f"{root}/saes/scope", "checkpoint": None}),
        (
            "sample",
            {
                "sources": [f"{root}/laion/{{00000..00001}}.tar"],
                "n_images": 120,
                "n_skipped": 1,
                "skipped": [
                    {
                        "source": f"{root}/laion/00001.tar",
                        "key": "000001234",
                        "reason": f"cannot decode {root}/laion/00001.tar/000001234.jpg",
                    }
                ],
                "failed_shards": [{"shard": 1, "reason": f"{root}/laion/00001.tar: truncated"}],
            },
        ),
    ):
        con.execute("UPDATE meta SET value = ? WHERE key = ?", [json.dumps(value), key])
    con.execute("UPDATE layers SET sae_file = ? || '/saes/scope/' || layer || '_resid/1200013184.pt'", [str(root)])
    con.execute("UPDATE images SET source = ? || '/laion/0000' || (image_id % 2) || '.tar'", [str(root)])
    con.close()
    return path


def machine_paths(tmp_path_factory) -> list[str]:
    return [str(tmp_path_factory.getbasetemp()), str(REPO), str(Path.home())]


def served_text(client: TestClient) -> dict[str, str]:
    """Every page and JSON answer (GET routes with real values), and a refused upload."""
    index = client.app.state.index
    image_id = index.examples(20, 8, heatmaps=False)[0]["image_id"]
    values = {
        "layer": "20",
        "feature": "8",
        "image_id": str(image_id),
        "index_id": index.index_id,
        "upload_id": "0" * 32,
        "intervention_id": "1" * 32,
        "tokens": "1000",
    }
    answers = {}
    for endpoint in endpoints(client.app):
        if "GET" in endpoint.methods:
            assert set(endpoint.path_params) <= set(values), f"give {endpoint.path_params} a value in this test"
            url = fill(endpoint.path, values)
            answers[url] = client.get(url).text
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(jpeg, "JPEG")
    answers["POST /api/encode"] = client.post(
        "/api/encode", files={"file": ("a.jpg", jpeg.getvalue(), "image/jpeg")}
    ).text
    return answers


@pytest.mark.parametrize("show_local_paths", [False, True])
def test_pages_show_no_local_path_unless_asked(local_index, tiny_model_dir, tmp_path_factory, show_local_paths):
    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    missing_sae = local_index.parent / "saes" / "not-here"
    settings = Settings(
        index=local_index,
        upload_store=tmp_path_factory.mktemp("uploads"),
        live_model=f"local-dir:{tiny_model_dir}",
        live_sae=str(missing_sae),
        live_layers=[1],
        live_device="cpu",
        upload_rate_limit=0,
        show_local_paths=show_local_paths,
    )
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert client.app.state.live.wait(120)
        assert client.app.state.live.state == "failed" and str(missing_sae) in client.app.state.live.message
        answers = served_text(client)
    assert len(answers) > 25
    overview, upload = answers["/api"], answers["/api/upload"]
    if show_local_paths:
        assert f"local-dir:{local_index.parent}/models/tiny-clip" in overview and str(missing_sae) in upload
        return
    for url, text in answers.items():
        for path in machine_paths(tmp_path_factory):
            assert path not in text, (url, path)
    assert '"name":"local-dir:tiny-clip"' in overview and '"source":"scope"' in overview
    assert '"sources":["laion/{00000..00001}.tar"]' in overview and '"sae_file":"20_resid/1200013184.pt"' in overview
    assert "not-here" in upload and f'"model":"local-dir:{tiny_model_dir.name}"' in upload
    assert "local-dir:tiny-clip" in answers["/"]  # the footer of every page
