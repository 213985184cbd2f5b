"""Shared fixtures: a tiny open_clip model and tiny SAEs in the released layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipscope_explorer.precompute.demo.scenes import save_tiny_clip
from clipscope_explorer.precompute.model.checkpoints import save_checkpoint

TINY_LAYERS = (1, 2)
TINY_FEATURES = 256
TINY_K = 8
TINY_WIDTH = 64


@pytest.fixture(scope="session", autouse=True)
def text_tower_off_unless_asked(tmp_path_factory):
    """Apps and servers the tests start (in this process or as subprocesses) load no text tower unless a test
    says `text=True`, as they pass --no-live for the model: most test indexes name the released ViT-L/14,
    which cannot load offline. Search caches go to a temporary folder, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSCOPE_TEXT", "false")
        patch.setenv("CLIPSCOPE_SEARCH_CACHE", str(tmp_path_factory.mktemp("search_cache")))
        yield


def random_sae_tensors(d_in: int, n_features: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    enc = torch.randn(d_in, n_features, generator=generator) / d_in**0.5
    dec = enc.T.contiguous() + 0.01 * torch.randn(n_features, d_in, generator=generator)
    pre_b = 0.1 * torch.randn(d_in, generator=generator)
    return pre_b, enc, dec


def write_sae_repo(
    root: Path, layers=TINY_LAYERS, checkpoints=(1000, 2000), d_in=TINY_WIDTH, n_features=TINY_FEATURES, k=TINY_K
) -> Path:
    """A folder shaped like the hub repo: {layer}_resid/{token_count}.pt, plus the extras."""
    for layer in layers:
        for index, token_count in enumerate(checkpoints):
            pre_b, enc, dec = random_sae_tensors(d_in, n_features, seed=100 * layer + index)
            save_checkpoint(root / f"{layer}_resid" / f"{token_count}.pt", pre_b, enc, dec, k, token_count)
        (root / f"{layer}_resid" / f"{layer}_resid-abc123.jsonl").write_text("{}\n")
    (root / "README.md").write_text("tiny SAE suite\n")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_spec(tiny_model_dir) -> str:
    return f"local-dir:{tiny_model_dir}"


@pytest.fixture(scope="session")
def tiny_sae_repo(tmp_path_factory) -> Path:
    return write_sae_repo(tmp_path_factory.mktemp("sae_repo"))


@pytest.fixture(scope="session")
def tiny_tower(tiny_model_spec):
    from clipscope_explorer.precompute.model.vision import load_tower

    return load_tower(tiny_model_spec, device="cpu")


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    from tests.fixtures import write_shards

    folder = tmp_path_factory.mktemp("laion")
    write_shards(folder, n_shards=3, per_shard=14, corrupt={5})
    return folder


def precompute_config(shard_dir: Path, model_spec: str, sae_repo: Path, out: Path, **overrides):
    from clipscope_explorer.precompute.job import PrecomputeConfig

    settings = dict(
        images=[f"{shard_dir}/{{00000..00002}}.tar"],
        out=out,
        model=model_spec,
        sae=str(sae_repo),
        layers=list(TINY_LAYERS),
        top_n=6,
        band_size=2,
        band_samples=12,
        batch_size=8,
        device="cpu",
        workers=0,
        progress=False,
    )
    settings.update(overrides)
    return PrecomputeConfig(**settings)


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, shard_dir, tiny_model_spec, tiny_sae_repo) -> Path:
    """An index built by the real precompute job on the tiny fixtures."""
    from clipscope_explorer.precompute.job import run

    out = tmp_path_factory.mktemp("index") / "tiny.duckdb"
    return run(precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, out, workers=2))
