"""Every URL the app links to, built in one place (pages, their JSON twins, images).

Page URLs are stable (they are shared in papers and chats). Image URLs carry
the index id, so they can be cached forever: a new index gets new URLs.
"""

from __future__ import annotations

from urllib.parse import urlencode


def twin(path: str, query: str = "") -> str:
    """The JSON twin of the page at `path`: `/` -> `/api`, `/x` -> `/api/x`."""
    base = "/api" if path == "/" else "/api" + path
    return f"{base}?{query}" if query else base


class Urls:
    """URLs for one index (image URLs include its id)."""

    def __init__(self, index_id: str):
        self.index_id = index_id

    @staticmethod
    def layer(layer: int, **query) -> str:
        params = {k: v for k, v in query.items() if v not in (None, "")}
        return f"/layers/{layer}" + (f"?{urlencode(params)}" if params else "")

    @staticmethod
    def feature(layer: int, feature: int) -> str:
        return f"/layers/{layer}/features/{feature}"

    @staticmethod
    def random(layer: int) -> str:
        return f"/layers/{layer}/random"

    @staticmethod
    def example(layer: int, feature: int, image_id: int) -> str:
        return f"/layers/{layer}/features/{feature}/examples/{image_id}"

    @staticmethod
    def search(**query) -> str:
        params = {k: v for k, v in query.items() if v not in (None, "")}
        return "/search" + (f"?{urlencode(params)}" if params else "")

    def thumbnail(self, image_id: int) -> str:
        return f"/images/{self.index_id}/{image_id}.jpg"

    def overlay(self, layer: int, feature: int, image_id: int) -> str:
        return f"/images/{self.index_id}/layers/{layer}/features/{feature}/{image_id}.png"

    def positions(self, layer: int, feature: int) -> str:
        return f"/images/{self.index_id}/layers/{layer}/features/{feature}/positions.png"

    def preview(self, layer: int, feature: int) -> str:
        return f"/images/{self.index_id}/layers/{layer}/features/{feature}/preview.jpg"

    def mse_map(self, layer: int) -> str:
        return f"/images/{self.index_id}/layers/{layer}/mse.png"
