"""The training panel on an index without checkpoint tables (the page tests' index): empty, never an error. The
panel with checkpoints is tested on a measured tiny index in tests/test_checkpoints.py."""

from __future__ import annotations

from clipscope_explorer.app.pages.training import centre_border_ratio, patch_masks


def test_no_checkpoints_is_an_empty_list_and_null(client):
    data = client.get("/api/layers/20/checkpoints").json()
    assert data["layer"] == 20 and data["checkpoints"] == []
    page = client.get("/layers/20/checkpoints")
    assert page.status_code == 200 and "holds no training checkpoints" in page.text
    assert client.get("/api/layers/20").json()["training"] is None
    assert "Over training" not in client.get("/layers/20").text
    assert client.get("/api/layers/20/features/8").json()["first_seen"] is None
    assert client.get("/api/layers/3/checkpoints").status_code == 404


def test_centre_and_border_on_the_released_grid():
    centre, border = patch_masks((16, 16))
    assert centre.sum() == 64 and border.sum() == 60 and not (centre & border).any()
    values = [0.0] + [2.0 if c else 1.0 for c in centre]  # CLS first, then row-major patches
    assert centre_border_ratio(values, (16, 16)) == 2.0
    assert centre_border_ratio([0.0] * 5, (2, 2)) is None
