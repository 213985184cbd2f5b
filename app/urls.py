"""Every URL the app emits, built in one place: pages, their JSON twins, images, uploads, static files.

Page URLs are stable (they are shared in papers and chats). Image URLs carry
the index id, so they can be cached forever: a new index gets new URLs.
Behind a reverse proxy the app may live under a path prefix (the ASGI
`root_path`, set by `CLIPSCOPE_ROOT_PATH`); every URL built here starts with
it. Templates get a `Urls` as `urls`; JavaScript reads URLs from the
`data-` attributes the templates write.
"""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import HTTPConnection


def root_path(connection: HTTPConnection) -> str:
    """The path prefix this request came through ('' when none), without a trailing slash."""
    scope = connection.scope
    return (scope.get("app_root_path") or scope.get("root_path") or "").rstrip("/")


def app_path(scope) -> str:
    """The request's path inside the app: its ASGI `path` without the `root_path` prefix."""
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


def _query(query: dict) -> str:
    params = {k: v for k, v in query.items() if v not in (None, "")}
    return f"?{urlencode(params)}" if params else ""


class Urls:
    """URLs for one index served under `root` ('' or a prefix such as `/explorer`)."""

    def __init__(self, index_id: str, root: str = ""):
        self.index_id = index_id
        self.root = root

    def app(self, path: str, **query) -> str:
        """Any path of the app (`/layers`, `/docs`), with the prefix in front."""
        return self.root + path + _query(query)

    def twin(self, url: str) -> str:
        """The JSON twin of a page URL made here: `/` -> `/api`, `/x?q` -> `/api/x?q`."""
        path, mark, query = url.removeprefix(self.root).partition("?")
        return self.root + ("/api" if path == "/" else "/api" + path) + mark + query

    # pages
    def overview(self) -> str:
        return self.app("/")

    def layers(self) -> str:
        return self.app("/layers")

    def layer(self, layer: int, **query) -> str:
        return self.app(f"/layers/{layer}", **query)

    def feature(self, layer: int, feature: int | str) -> str:
        return self.app(f"/layers/{layer}/features/{feature}")

    def random(self, layer: int) -> str:
        return self.app(f"/layers/{layer}/random")

    def training(self, layer: int) -> str:
        return self.app(f"/layers/{layer}/checkpoints")

    def lineage(self, layer: int, feature: int) -> str:
        return self.app(f"/layers/{layer}/features/{feature}/lineage")

    def concepts(self, layer: int, feature: int) -> str:
        return self.app("/concepts", layer=layer, feature=feature)

    def example(self, layer: int, feature: int, image_id: int) -> str:
        return self.app(f"/layers/{layer}/features/{feature}/examples/{image_id}")

    def search(self, **query) -> str:
        return self.app("/search", **query)

    def search_images(self, **query) -> str:
        return self.app("/search/images", **query)

    def sample(self, image_id: int) -> str:
        return self.app(f"/samples/{image_id}")

    def upload(self) -> str:
        return self.app("/upload")

    def docs(self) -> str:
        return self.app("/docs")

    def openapi(self) -> str:
        return self.app("/openapi.json")

    def static(self, name: str) -> str:
        return self.app(f"/static/{name}")

    # a stored upload (its id is a content hash)
    def upload_result(self, upload_id: str, **query) -> str:
        return self.app(f"/uploads/{upload_id}", **query)

    def upload_image(self, upload_id: str) -> str:
        return self.app(f"/uploads/{upload_id}/image.jpg")

    def upload_preview(self, upload_id: str) -> str:
        return self.app(f"/uploads/{upload_id}/preview.jpg")

    def intervention(self, upload_id: str, intervention_id: str) -> str:
        return self.app(f"/uploads/{upload_id}/interventions/{intervention_id}")

    # images of this index
    def thumbnail(self, image_id: int) -> str:
        return self.app(f"/images/{self.index_id}/{image_id}.jpg")

    def overlay(self, layer: int, feature: int, image_id: int) -> str:
        return self.app(f"/images/{self.index_id}/layers/{layer}/features/{feature}/{image_id}.png")

    def positions(self, layer: int, feature: int) -> str:
        return self.app(f"/images/{self.index_id}/layers/{layer}/features/{feature}/positions.png")

    def preview(self, layer: int, feature: int) -> str:
        return self.app(f"/images/{self.index_id}/layers/{layer}/features/{feature}/preview.jpg")

    def mse_map(self, layer: int) -> str:
        return self.app(f"/images/{self.index_id}/layers/{layer}/mse.png")

    def checkpoint_map(self, layer: int, tokens: int) -> str:
        return self.app(f"/images/{self.index_id}/layers/{layer}/checkpoints/{tokens}/mse.png")


PAGES = Urls(index_id="")  # page paths inside the app, for `NotFound` links (the error answer adds the prefix)


def urls_for(connection: HTTPConnection) -> Urls:
    """The `Urls` of the index this app serves, under the request's path prefix."""
    site = getattr(connection.app.state, "site", None)  # None only before the index is open
    return Urls(site.index_id if site else "", root_path(connection))
