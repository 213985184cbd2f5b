"""How the Python API's objects show themselves: a feature as a card in Jupyter (`_repr_html_`: label,
statistics, top images with their heatmap overlays, every image inline as a data: URL, so the HTML is
self-contained and fetches nothing), and as one line in a terminal (`__repr__`).

The card is the embed route's (`templates/_card.html`, styled by `static/embed.css`), rendered here with the
server's own Jinja environment and filters; the objects are the server's JSON models (`FeaturePage`,
`LayerInfo`), subclassed only to add those two methods, so their fields and `model_dump()` are the JSON's.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from functools import lru_cache

from pydantic import PrivateAttr

from clipscope_explorer.app.images import overlay_data_url
from clipscope_explorer.app.models import LayerInfo
from clipscope_explorer.app.pages.features import FeaturePage
from clipscope_explorer.app.templating import TEMPLATES_DIR, make_templates, sig

CARD_CSS = TEMPLATES_DIR.parent / "static" / "embed.css"
CARD_IMAGES = 10  # top images on a card (two rows of five)
CARD = """{% from "_card.html" import card %}<style>{{ css }}</style>
{{ card(page, link=link, limit=limit, footer=footer, inline=inline) }}"""

Thumbnails = Callable[[list[int]], dict[int, bytes]]  # image ids -> JPEG thumbnails (those the index holds)


@lru_cache(maxsize=1)
def _template():
    return make_templates().env.from_string(CARD)


@lru_cache(maxsize=1)
def _css() -> str:
    return CARD_CSS.read_text()


@lru_cache(maxsize=1)
def _blank() -> str:
    """A transparent pixel, for an example whose thumbnail the index lacks."""
    return overlay_data_url([0.0], None, (1, 1))


def _jpeg_url(jpeg: bytes | None) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else _blank()


def feature_card(page: FeaturePage, thumbnail: Thumbnails, link: str | None = None, limit: int = CARD_IMAGES) -> str:
    """The card of `page` (its JSON twin's data, heatmaps included) as self-contained HTML."""
    patches = page.grid[0] * page.grid[1]
    thumbnails = thumbnail([e.image_id for e in page.top_images[:limit]])
    inline = {
        e.image_id: (
            _jpeg_url(thumbnails.get(e.image_id)),
            overlay_data_url(e.heatmap or [0.0] * patches, page.max_activation, page.grid),
        )
        for e in page.top_images[:limit]
    }
    return _template().render(
        css=_css(), page=page, inline=inline, link=link, limit=limit, footer="CLIP-Scope Explorer"
    )


class Feature(FeaturePage):
    """A feature page's data (`FeaturePage`, the JSON twin's model: `feature.top_images[0].heatmap`), shown as a
    card in Jupyter (its thumbnails read from the index then, so while it is open) and in one line in a terminal."""

    _thumbnail: Thumbnails | None = PrivateAttr(None)
    _link: str | None = PrivateAttr(None)

    @classmethod
    def of(cls, page: FeaturePage, thumbnail: Thumbnails, link: str | None = None) -> Feature:
        feature = cls.model_construct(**{name: getattr(page, name) for name in FeaturePage.model_fields})
        feature._thumbnail, feature._link = thumbnail, link
        return feature

    def __repr__(self) -> str:
        label = f'"{self.label}"' if self.label else "(no label)"
        state = "dead" if self.dead else f"freq={sig(self.frequency, 3)}"
        return f"<Feature L{self.layer}/{self.feature} {label} {state}>"

    __str__ = __repr__  # print(feature) too (pydantic's str lists every field)

    def _repr_html_(self) -> str:
        return feature_card(self, self._thumbnail or (lambda image_ids: {}), self._link)


class Layer(LayerInfo):
    """A layer's row (`LayerInfo`, an item of `/api/layers`), in one line in a terminal."""

    @classmethod
    def of(cls, info: LayerInfo) -> Layer:
        return cls.model_construct(**{name: getattr(info, name) for name in LayerInfo.model_fields})

    def __repr__(self) -> str:
        return (
            f"<Layer {self.layer}: {self.n_features:,} features, L0 {sig(self.l0, 3)}, "
            f"explained variance {sig(self.explained_variance, 3)}>"
        )

    __str__ = __repr__
