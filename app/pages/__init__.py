"""The app's routers, registered in one place (order matters only for readability)."""

from __future__ import annotations

from fastapi import FastAPI

from clipscope_explorer.app.pages import (
    docs,
    embed,
    features,
    image_search,
    images,
    interventions,
    layers,
    lineage,
    overview,
    samples,
    search,
    training,
    uploads,
)


def register(app: FastAPI) -> None:
    for module in (
        overview,
        layers,
        training,
        features,
        lineage,
        embed,
        samples,
        search,
        image_search,
        uploads,
        interventions,
        images,
        docs,
    ):
        app.include_router(module.router)
