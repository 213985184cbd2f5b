"""The fast first pass of search by meaning (the torch side: `MeaningService` imports it only after the
text tower has loaded torch, so `--no-text` servers never import it).

torch multiplies the float16 matrix by the float16 query in one pass (`torch.mv`; it accumulates in
float32 and rounds each result to float16), at memory speed on every core, where converting the matrix to
float32 first costs several times more (bench/search.py). The error against the exact score of a unit row
and a unit query stays below `BOUND`: rounding the query to float16 moves the score by at most
2**-11 * sum|row_i * query_i| <= 2**-11; the float32 sum by at most 768 * 2**-24; rounding the result
(|score| <= 1) by 2**-12; together under 7.8e-4. `vectors.scorer_is_within_bound` checks a sample
against it before this scorer is used.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

BOUND = 1e-3


class TorchScorer:
    bound = BOUND

    def coarse(self, matrix: np.ndarray, query: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, float]:
        with warnings.catch_warnings():  # a read-only memory map: torch is only ever given it to read
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.from_numpy(matrix[start:stop])
        with torch.inference_mode():
            scores = torch.mv(rows, torch.from_numpy(np.asarray(query, dtype=np.float32)).half())
        return scores.numpy().astype(np.float32), self.bound
