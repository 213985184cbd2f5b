"""Peak memory of the precompute against the number of images: it must not grow with the sample.

Runs the real job (tiny demo-sized ViT, a 512-feature SAE, 2 layers) in a
fresh process on 1,000 and on 4,000 procedural images and compares the peak
resident set size of the main process (data-loading workers excluded).
Target: peak RSS at 4,000 images <= 1.10 x peak RSS at 1,000.
"""

from __future__ import annotations

import subprocess
import sys

from _timing import REPO_ROOT, result_line

CACHE = REPO_ROOT / "bench" / ".cache" / "memory"
SIZES, TARGET = (1000, 4000), 1.10

CHILD = """
import resource, sys
from pathlib import Path
from clipscope_explorer.precompute.job import PrecomputeConfig, run
cache, n = Path(sys.argv[1]), int(sys.argv[2])
out = cache / f"mem-{n}.duckdb"
run(PrecomputeConfig(images=[str(cache / "images")], out=out, model=f"local-dir:{cache / 'model'}",
                     sae=str(cache / "sae"), layers=[1, 3], max_images=n, batch_size=64, device="cpu",
                     workers=1, progress=False, fresh=True))
out.unlink()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def prepare() -> None:
    import torch

    from clipscope_explorer.precompute.demo.build import DEMO_MODEL, DEMO_POSITION_SCALE
    from clipscope_explorer.precompute.model.checkpoints import save_checkpoint
    from clipscope_explorer.precompute.demo.scenes import save_tiny_clip, tiny_clip_config, write_scenes

    write_scenes(CACHE / "images", max(SIZES))
    if not (CACHE / "model" / "open_clip_pytorch_model.bin").is_file():
        save_tiny_clip(CACHE / "model", tiny_clip_config(**DEMO_MODEL), position_scale=DEMO_POSITION_SCALE)
    width = DEMO_MODEL["width"]
    for layer in (1, 3):
        path = CACHE / "sae" / f"{layer}_resid" / "1000.pt"
        if not path.is_file():
            enc = torch.randn(width, 512, generator=torch.Generator().manual_seed(layer)) / width**0.5
            save_checkpoint(path, torch.zeros(width), enc, enc.T.contiguous(), 8, 1000)


def peak_rss_mib(n_images: int) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, str(CACHE), str(n_images)], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    prepare()
    peaks = {n: peak_rss_mib(n) for n in SIZES}
    for n, peak in peaks.items():
        print(f"{n} images: peak RSS {peak:.0f} MiB")
    line, _ = result_line("precompute_memory_growth", peaks[SIZES[1]] / peaks[SIZES[0]], "<=", TARGET)
    print(line)


if __name__ == "__main__":
    main()
