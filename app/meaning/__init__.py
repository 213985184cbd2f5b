"""Search by meaning: CLIP's text tower (loaded in the background) and exact top-k over the index's
image embeddings and feature prototypes (`service.py`, `vectors.py`, `prompts.py`, `info.py`)."""
