"""Names of the CLIP-Scope release (importable without torch, e.g. by the CLI's option defaults)."""

DEFAULT_MODEL = "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
DEFAULT_SAE_REPO = "lewington/CLIP-ViT-L-scope"
RELEASED_LAYERS = (2, 5, 8, 11, 14, 17, 20, 22)
RELEASED_K = 32
