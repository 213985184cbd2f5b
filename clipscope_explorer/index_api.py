"""`open_index(path)`: an index in Python, read-only, without a server (docs/python.md).

Every method calls the data function of the page whose JSON it returns (`app/pages/*.py`, over
`app/queries.py`), so the API and the JSON API are one implementation: `index.feature(20, 1234)` is
`GET /api/layers/20/features/1234` as a `FeaturePage`, `index.search("dog")` is `GET /api/search?q=dog`,
`index.encode(image)` is `POST /api/encode` with uploads not stored. URLs in the results are the server's
paths. Lists of rows (`features`, `top_images`) are `pyarrow.Table`s (`.to_pandas()`, `polars.from_arrow`,
or DuckDB can read them) with the JSON rows' fields as columns. Search by meaning and encoding load their
models on first use (`index_services.py`); errors are one line: `IndexOpenError` for a file that is no index
(the messages `serve` gives), `NotInIndex` (a `KeyError`) for an unknown layer or feature, `ValueError` for
bad arguments or an unreadable image, `Unavailable` when a model cannot be loaded.
"""

from __future__ import annotations

import operator
from pathlib import Path

import pyarrow as pa
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from clipscope_explorer.app.deps import require_layer
from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.index_file import IndexOpenError
from clipscope_explorer.app.live.intervention import InterventionResult
from clipscope_explorer.app.live.result import UploadResult
from clipscope_explorer.app.pages.features import Example, feature_page
from clipscope_explorer.app.pages.layers import Filters, TableRow, layer_table
from clipscope_explorer.app.pages.overview import IndexInfo, index_info, layers_page
from clipscope_explorer.app.pages.search import SearchPage, SearchQuery, parse_jump, search_page
from clipscope_explorer.app.pages.twins import Redirect
from clipscope_explorer.app.queries import open_index as open_data
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.app.urls import Urls
from clipscope_explorer.cards import Feature, Layer
from clipscope_explorer.index_services import Services, Unavailable
from clipscope_explorer.tables import arrow_table

__all__ = ["Index", "IndexOpenError", "NotInIndex", "Unavailable", "open_index"]

MAX_LIMIT = 5000  # the largest search `limit` (the server's largest CLIPSCOPE_MAX_PAGE_SIZE)
LIVE_ARGUMENTS = ("model", "pretrained", "sae", "layers", "device", "precision")
ARGUMENTS = {"index": "path", "search_cache": "cache_dir", **{f"live_{name}": name for name in LIVE_ARGUMENTS}}


class NotInIndex(KeyError):
    """An unknown layer or feature; the message is one line (the 404 page's)."""

    def __str__(self) -> str:
        return str(self.args[0])


def open_index(
    path: str | Path,
    *,
    text: bool = True,
    model: str | None = None,
    pretrained: str | None = None,
    sae: str | None = None,
    layers: list[int] | None = None,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    site_url: str | None = None,
) -> Index:
    """Open the index file at `path` read-only (`IndexOpenError` when it is missing, corrupt or not an index).

    `text=False` keeps search to words (CLIP's text tower is never loaded). `model`, `pretrained`, `sae`,
    `layers`, `device` and `precision` choose what `encode` loads, as `serve`'s `--live-*` flags do (default:
    what the index was built with). `cache_dir`: where the index's embeddings are exported for search by
    meaning (default `CLIPSCOPE_SEARCH_CACHE`, else `~/.cache/clipscope-explorer/search`). `site_url`: the
    public URL of a server of this index (`https://explorer.example.org`), for the cards' links."""
    options = dict(
        index=Path(path),
        text=text,
        live_model=model,
        live_pretrained=pretrained,
        live_sae=sae,
        live_layers=layers,
        live_device=device,
        live_precision=precision,
        store_uploads=False,
        max_page_size=MAX_LIMIT,
    )
    if cache_dir is not None:
        options["search_cache"] = Path(cache_dir)
    try:
        settings = Settings(**options)
    except ValidationError as error:  # named by this function's arguments, not the server's settings
        names = [str((e["loc"] or ("settings",))[0]) for e in error.errors()]
        problems = "; ".join(f"{ARGUMENTS.get(n, n)}: {e['msg']}" for n, e in zip(names, error.errors()))
        raise ValueError(f"open_index: {problems}") from None
    data = open_data(
        settings.index,
        threads=settings.duckdb_threads,
        memory_limit=settings.duckdb_memory_limit,
        image_cache_size=settings.image_cache_size,
        show_local_paths=settings.show_local_paths,
    )
    return Index(data, settings, site_url)


def _not_found(error: NotFound) -> NotInIndex:
    return NotInIndex(error.message)


def _number(value, what: str) -> int:
    """`value` as an int when it is a whole number (a Python or NumPy integer), else a one-line ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a whole number, not {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a whole number, not {value!r}") from None


class Index:
    """A read-only index (from `open_index`): the JSON API's data as Python objects and Arrow tables."""

    def __init__(self, data, settings: Settings, site_url: str | None = None):
        self._data = data
        self._settings = settings
        self._urls = Urls(data.index_id)
        self._site = site_url.rstrip("/") if site_url else None
        self._services = Services(data, settings, self._urls)
        self.path = data.path
        self.index_id = data.index_id

    # -- what the index is ---------------------------------------------------
    @property
    def info(self) -> IndexInfo:
        """The run metadata (`GET /api`'s `index`)."""
        return index_info(self._data)

    @property
    def layers(self) -> list[Layer]:
        """Every layer with its metrics (`GET /api/layers`'s `layers`)."""
        return [Layer.of(info) for info in layers_page(index=self._data, urls=self._urls).layers]

    # -- features ------------------------------------------------------------
    def feature(self, layer: int, feature: int) -> Feature:
        """One feature (`GET /api/layers/{layer}/features/{feature}`), heatmaps and position means included."""
        layer, feature = _number(layer, "layer"), _number(feature, "feature")
        try:
            page = feature_page(index=self._data, urls=self._urls, layer=layer, feature=feature, detail=True)
        except NotFound as error:
            raise _not_found(error) from None
        link = self._site + self._urls.feature(layer, feature) if self._site else None
        return Feature.of(page, self._data.thumbnails, link)

    def top_images(self, layer: int, feature: int) -> pa.Table:
        """A feature's top images, best first: the rows of its `top_images` (`Example` fields as columns)."""
        return arrow_table(Example, self.feature(layer, feature).top_images)

    def features(
        self,
        layer: int,
        *,
        sort: str = "feature",
        order: str = "asc",
        min_freq: float | None = None,
        max_freq: float | None = None,
        q: str = "",
        limit: int | None = None,
    ) -> pa.Table:
        """A layer's features as its table lists them (`GET /api/layers/{layer}`'s `features`), every one that
        passes the filters unless `limit` says fewer. `sort`: feature, frequency, image_frequency,
        cls_frequency, max_activation or mean_activation; `order`: asc or desc; `min_freq` (exclusive) and
        `max_freq` bound the token frequency (`min_freq=0` drops dead features); `q`: words the label holds."""
        filters = Filters(sort=sort, order=order, min_freq=min_freq, max_freq=max_freq, q=q)  # ValueError when bad
        layer = _number(layer, "layer")
        try:
            size = require_layer(self._data, layer)["n_features"] if limit is None else _number(limit, "limit")
            if size < 1:
                raise ValueError(f"limit must be at least 1, not {limit}")
            page = layer_table(self._data, self._urls, layer, filters, 1, size)
        except NotFound as error:
            raise _not_found(error) from None
        return arrow_table(TableRow, page.features)

    # -- search and encoding -------------------------------------------------
    def search(
        self,
        q: str,
        *,
        by: str | None = None,
        layer: int | None = None,
        limit: int = 50,
        template: str | None = None,
    ) -> SearchPage | Feature:
        """Features by label and caption words, or by meaning (`GET /api/search`): `by` words or meaning
        (default: meaning when CLIP's text tower loads, else words); `layer` one layer; `template` the prompt
        around `q` for search by meaning ('a photo of {}'). A query naming a feature (`20/1234`) returns it."""
        given = dict(q=q, layer=layer, limit=limit, by=by, template=template)
        query = SearchQuery(**{k: v for k, v in given.items() if v is not None})  # ValueError when bad
        jump = parse_jump(query.q)
        if jump and self._data.has_feature(*jump):  # where the JSON twin redirects, before any model loads
            return self.feature(*jump)
        meaning = self._services.meaning(text=query.by != "words")
        try:
            found = search_page(
                index=self._data, settings=self._settings, urls=self._urls, meaning=meaning, detail=True, query=query
            )
        except HTTPException as error:  # by="meaning" where it cannot run: the JSON twin's 503
            raise Unavailable(str(error.detail)) from None
        if isinstance(found, Redirect):
            return self.feature(*parse_jump(q))
        return found

    def encode(
        self, image, *, layers: list[int] | None = None, sort: str = "max", top: int = 16, patches: bool = False
    ) -> UploadResult:
        """The features firing on `image` (a path, bytes, a binary file or a PIL image), as `POST /api/encode`
        answers: the model and SAEs load on first use (`Unavailable` when they cannot). `layers` (default all
        encoded), `sort` (max, patch, cls or mean), `top` features per layer and `patches` as the upload's
        form fields."""
        return self._services.encode(image, layers, sort, top, patches)

    def intervene(
        self,
        image,
        layer: int,
        feature: int,
        *,
        scale: float = 0.0,
        patches: list[int] | None = None,
        prompts: list[str] | None = None,
        template: str | None = None,
        top: int = 20,
    ) -> InterventionResult:
        """Scale `feature` at `layer` on `image` and run the rest of the model, as `POST /api/intervene` answers
        for a `file` (`scale` in [-10, 10]; `patches` row-major, None for every token; `prompts` default to the
        image's zero-shot labels). A bad argument is a `ValueError` with the 422's message."""
        fields = {"layer": [str(layer)], "feature": [str(feature)], "scale": [repr(float(scale))], "top": [str(top)]}
        if patches is not None:
            fields["patches"] = [",".join(map(str, patches))]
        if prompts is not None:
            fields["prompts"] = ["\n".join(prompts)]
        if template is not None:
            fields["template"] = [template]
        return self._services.intervene(image, fields)

    # -- the file --------------------------------------------------------------
    def close(self) -> None:
        self._services.close()
        self._data.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        layers = ", ".join(map(str, sorted(self._data.layers)))
        return f"<Index {self.path.name} layers [{layers}] model {self.info.model.get('name')}>"
