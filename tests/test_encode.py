"""`clipscope_explorer.precompute.index.image_features` against the schema's definitions written out densely."""

import torch

from clipscope_explorer.precompute.index.image_features import image_features


def test_image_features_match_dense_definitions():
    generator = torch.Generator().manual_seed(0)
    tokens, k, n_features = 257, 8, 40
    indices = torch.stack([torch.randperm(n_features, generator=generator)[:k] for _ in range(tokens)])
    values = torch.randn(tokens, k, generator=generator)  # kept values may be <= 0: those do not fire
    values[0, 0] = 9.0  # a feature on CLS only: its patch activation is 0
    values[1:][indices[1:] == indices[0, 0]] = -1.0
    dense = torch.zeros(tokens, n_features)
    dense.scatter_(1, indices, values.clamp(min=0))
    summary = image_features(values.numpy(), indices.numpy())
    firing = torch.nonzero(dense.max(0).values > 0).flatten()
    assert sorted(summary.features.tolist()) == firing.tolist()
    heatmaps = summary.heatmaps(torch.arange(len(summary.features)))
    for row, feature in enumerate(summary.features.tolist()):
        assert summary.activation[row] == dense[:, feature].max()
        assert summary.cls_activation[row] == dense[0, feature]
        assert summary.patch_activation[row] == dense[1:, feature].max()
        torch.testing.assert_close(torch.tensor(summary.mean_activation[row]), dense[1:, feature].mean())
        torch.testing.assert_close(torch.from_numpy(heatmaps[row]), dense[1:, feature])
    assert (summary.activation[:-1] >= summary.activation[1:]).all()
    assert (summary.heatmaps([2, 0]) == heatmaps[[2, 0]]).all()
