"""Benchmark: our sparse SAE path against the released dense algorithm (CPU fp32).

Full-size SAE (d_in 1024, 65,536 features, k 32) with random weights, 2,056
tokens (8 images x 257 tokens). Ours: `sae.encode(x)` (chunked matmul + topk,
sparse codes) then `sae.decode(code)` (embedding_bag over k decoder rows).
Dense baseline, as released: pre = (x - pre_b) @ enc; topk; scatter into a
dense [T, 65536] latent; recon = latent @ dec + pre_b. Both are measured in
the same run, interleaved, median of REPEATS after one warm-up.

Run from the repo root: python bench/sae_encode.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _timing (which adds the repo root)

import torch  # noqa: E402
from _timing import interleaved_medians, paired_ratio, result_line  # noqa: E402

from clipscope_explorer.precompute.model.sae import TopKSAE  # noqa: E402

D_IN, N_FEATURES, K, TOKENS = 1024, 65_536, 32, 2_056
REPEATS = 7
TARGET_OP, TARGET = "<=", 0.60


def dense_reference(x, pre_b, enc, dec, k):
    """The released forward pass, written out plainly (dense latent)."""
    with torch.inference_mode():
        pre = (x - pre_b) @ enc
        top = torch.topk(pre, k, dim=-1)
        latent = torch.zeros(x.shape[0], enc.shape[1], dtype=pre.dtype)
        latent.scatter_(-1, top.indices, top.values)
        recon = latent @ dec + pre_b
    return top.indices, recon


def ours(sae, x):
    code = sae.encode(x)
    return code.indices, sae.decode(code)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32")
    print(f"SAE d_in={D_IN} n_features={N_FEATURES} k={K}; {TOKENS} tokens; {REPEATS} interleaved repeats")
    enc = torch.randn(D_IN, N_FEATURES) / D_IN**0.5
    dec = enc.t().contiguous()
    pre_b = 0.1 * torch.randn(D_IN)
    sae = TopKSAE(pre_b, enc, dec, K)
    x = torch.randn(TOKENS, D_IN)
    pre_b, enc, dec = sae.pre_b.detach(), sae.enc.detach(), sae.dec.detach()

    # Correctness first: a benchmark of the wrong computation is worthless.
    ours_idx, ours_recon = ours(sae, x)
    ref_idx, ref_recon = dense_reference(x, pre_b, enc, dec, K)
    same_sets = torch.equal(ours_idx.sort(-1).values, ref_idx.sort(-1).values)
    max_err = (ours_recon - ref_recon).abs().max().item()
    print(f"check: same top-{K} indices: {same_sets}; max |recon diff| = {max_err:.2e}")
    assert same_sets, "sparse and dense paths chose different features"
    assert torch.allclose(ours_recon, ref_recon, atol=1e-4, rtol=1e-4), f"reconstructions differ by {max_err}"

    medians, times = interleaved_medians(
        {
            "ours (encode+decode)": lambda: ours(sae, x),
            "dense (released)": lambda: dense_reference(x, pre_b, enc, dec, K),
        },
        repeats=REPEATS,
    )
    t_ours, t_dense = medians["ours (encode+decode)"], medians["dense (released)"]
    print(
        f"ours {t_ours:.3f} s, dense {t_dense:.3f} s, "
        f"ours {TOKENS / t_ours:.0f} tok/s, dense {TOKENS / t_dense:.0f} tok/s"
    )
    print(
        f"(for reference, median of per-round ratios: "
        f"{paired_ratio(times, 'ours (encode+decode)', 'dense (released)'):.3f})"
    )
    line, _ = result_line("sae_encode_ratio", t_ours / t_dense, TARGET_OP, TARGET)
    print(line)


if __name__ == "__main__":
    main()
