"""The TopK sparse autoencoder of the CLIP-Scope release, and its loaders.

Forward pass, exactly as released (no ReLU anywhere, no encoder bias):
    pre    = (x - pre_b) @ enc                    # [T, F]
    top    = topk(pre, k)                         # kept values may be negative
    x_hat  = sum_j top.values_j * dec[top.idx_j] + pre_b

Codes stay sparse: `encode` returns k (value, index) pairs per token and
`decode` gathers k decoder rows with embedding_bag.

Checkpoints load from a hub repo (``{layer}_resid/{token_count}.pt``), a local
folder with the same layout, one ``.pt`` file, or a ``.safetensors`` file with
tensors ``pre_b``, ``enc``, ``dec`` (``k`` in its metadata).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from precompute.release import DEFAULT_SAE_REPO, RELEASED_K

CHECKPOINT_NAME = re.compile(r"^(\d+)\.(pt|safetensors)$")
# Tokens per encode chunk: peak extra memory is chunk x n_features x 4 bytes.
DEFAULT_CHUNK_TOKENS = 1024


class SAELoadError(RuntimeError):
    """An SAE checkpoint is missing, malformed, or does not fit the model."""


class SparseCode(NamedTuple):
    """TopK codes of a batch of tokens.

    values:  [..., k] float, the kept pre-activations (may be <= 0: no ReLU)
    indices: [..., k] int64, the feature index of each kept value
    """

    values: torch.Tensor
    indices: torch.Tensor


@dataclass(frozen=True)
class SAESource:
    """Where one layer's SAE came from, as recorded in the index."""

    source: str
    layer: int | None
    checkpoint: int | None
    file: str


class TopKSAE(nn.Module):
    """TopK SAE with the released parameters: pre_b [d], enc [d, F], dec [F, d]."""

    def __init__(
        self,
        pre_b: torch.Tensor,
        enc: torch.Tensor,
        dec: torch.Tensor,
        k: int,
        origin: SAESource | None = None,
    ):
        super().__init__()
        self.pre_b = nn.Parameter(pre_b.float(), requires_grad=False)
        self.enc = nn.Parameter(enc.float(), requires_grad=False)
        self.dec = nn.Parameter(dec.float(), requires_grad=False)
        self.k = int(k)
        self.origin = origin
        self.register_buffer("norm_mean", None)
        self.register_buffer("norm_std", None)

    @property
    def d_in(self) -> int:
        return self.enc.shape[0]

    @property
    def n_features(self) -> int:
        return self.enc.shape[1]

    @property
    def normalised(self) -> bool:
        return self.norm_mean is not None

    def set_normalisation(self, mean: torch.Tensor | None, std: torch.Tensor | None) -> None:
        """Standardise inputs per dimension before encoding; None restores raw input."""
        if mean is None:
            self.norm_mean = self.norm_std = None
            return
        device = self.enc.device
        self.norm_mean = mean.float().to(device)
        self.norm_std = std.float().clamp_min(1e-6).to(device)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Input as the SAE sees it: raw, or standardised when normalisation is set."""
        x = x.to(self.enc.device, torch.float32)
        if self.norm_mean is None:
            return x
        return (x - self.norm_mean) / self.norm_std

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> SparseCode:
        """Sparse codes of raw x [..., d_in] -> SparseCode([..., k], [..., k]).

        x is standardised here when normalisation is set (see `prepare`); `decode`
        then reconstructs `prepare(x)`, the input as the SAE saw it.

        Tokens are encoded in chunks, so the dense pre-activations never exceed
        chunk_tokens x n_features floats (256 MiB at the defaults, full size).
        """
        lead = x.shape[:-1]
        flat = self.prepare(x).reshape(-1, self.d_in)
        values = torch.empty(flat.shape[0], self.k, device=flat.device)
        indices = torch.empty(flat.shape[0], self.k, device=flat.device, dtype=torch.long)
        on_cuda = flat.device.type == "cuda"
        for start in range(0, flat.shape[0], chunk_tokens):
            chunk = flat[start : start + chunk_tokens] - self.pre_b
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                pre = chunk @ self.enc
            top = torch.topk(pre.float(), self.k, dim=-1)
            values[start : start + chunk_tokens] = top.values
            indices[start : start + chunk_tokens] = top.indices
        return SparseCode(values.reshape(*lead, self.k), indices.reshape(*lead, self.k))

    @torch.inference_mode()
    def decode(self, code: SparseCode) -> torch.Tensor:
        """Reconstruction [..., d_in] from k decoder rows per token (no dense latent)."""
        lead = code.indices.shape[:-1]
        rows = F.embedding_bag(
            code.indices.reshape(-1, self.k),
            self.dec,
            per_sample_weights=code.values.reshape(-1, self.k).to(self.dec.dtype),
            mode="sum",
        )
        return (rows + self.pre_b).reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor) -> tuple[SparseCode, torch.Tensor]:
        code = self.encode(x)
        return code, self.decode(code)

    def check_fits(self, width: int) -> None:
        if self.d_in != width:
            where = self.origin.file if self.origin else "SAE"
            raise SAELoadError(
                f"{where}: d_in is {self.d_in} but the model's residual width is {width}"
            )


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token squared error summed over dims [...]; its mean is the model card's MSE."""
    return (x - x_hat).pow(2).sum(-1)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - ||x - x_hat||^2 / ||x - mean_over_dims(x)||^2 [...]; average over tokens."""
    centred = (x - x.mean(-1, keepdim=True)).pow(2).sum(-1)
    return 1 - squared_error(x, x_hat) / centred.clamp_min(1e-12)


# ---------------------------------------------------------------- loading


RELEASED_KEYS = ("model_state_dict", "d_in", "n_features", "k")


@dataclass(frozen=True)
class _Checkpoint:
    tensors: dict
    d_in: int | None
    n_features: int | None
    k: int
    token_count: int | None


def _read_checkpoint(path: Path) -> _Checkpoint:
    """Tensors and header fields of a .pt or .safetensors file, with clear errors."""
    if not path.is_file():
        raise SAELoadError(f"SAE file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise SAELoadError(f"SAE file {path} is corrupt or not safetensors: {error}") from error
        header = {key: int(meta[key]) for key in ("d_in", "n_features", "k", "token_count") if key in meta}
        return _Checkpoint(tensors, header.get("d_in"), header.get("n_features"),
                           header.get("k", RELEASED_K), header.get("token_count"))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as error:
        raise SAELoadError(f"SAE file {path} is corrupt or not a torch checkpoint: {error}") from error
    missing = [key for key in RELEASED_KEYS if not isinstance(blob, dict) or key not in blob]
    if missing:
        raise SAELoadError(f"SAE file {path} lacks key(s) {missing}")
    token_count = blob.get("token_count")
    return _Checkpoint(blob["model_state_dict"], int(blob["d_in"]), int(blob["n_features"]), int(blob["k"]),
                       int(token_count) if token_count is not None else None)


def _validate(ckpt: _Checkpoint, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tensors = ckpt.tensors
    missing = [name for name in ("pre_b", "enc", "dec") if name not in tensors]
    if missing:
        raise SAELoadError(f"SAE file {path} lacks tensor(s) {missing} in its state dict")
    pre_b, enc, dec = tensors["pre_b"], tensors["enc"], tensors["dec"]
    d_in = ckpt.d_in if ckpt.d_in is not None else (enc.shape[0] if enc.ndim == 2 else -1)
    n_features = ckpt.n_features if ckpt.n_features is not None else (enc.shape[1] if enc.ndim == 2 else -1)
    expected = {"pre_b": (d_in,), "enc": (d_in, n_features), "dec": (n_features, d_in)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAELoadError(
                f"SAE file {path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"(d_in={d_in}, n_features={n_features})"
            )
    return pre_b, enc, dec


def load_checkpoint_file(path: str | Path, source: str | None = None, layer: int | None = None) -> TopKSAE:
    """Load one checkpoint file (.pt in the released layout, or .safetensors)."""
    path = Path(path)
    ckpt = _read_checkpoint(path)
    pre_b, enc, dec = _validate(ckpt, path)
    k, token_count = ckpt.k, ckpt.token_count
    if not 0 < k <= enc.shape[1]:
        raise SAELoadError(f"SAE file {path}: k={k} is not in 1..{enc.shape[1]}")
    if token_count is None:
        match = CHECKPOINT_NAME.match(path.name)
        token_count = int(match.group(1)) if match else None
    origin = SAESource(source or str(path), layer, int(token_count) if token_count is not None else None, str(path))
    return TopKSAE(pre_b, enc, dec, k, origin)


def _checkpoints_in(names: list[str]) -> dict[int, str]:
    found = {}
    for name in names:
        match = CHECKPOINT_NAME.match(name)
        if match:
            found[int(match.group(1))] = name
    return found


def _choose(found: dict[int, str], checkpoint: int | None, where: str) -> str:
    if not found:
        raise SAELoadError(f"no checkpoints ({{token_count}}.pt) in {where}")
    if checkpoint is None:
        return found[max(found)]
    if checkpoint not in found:
        listed = ", ".join(str(c) for c in sorted(found))
        raise SAELoadError(f"checkpoint {checkpoint} does not exist in {where}; available: {listed}")
    return found[checkpoint]


def _layer_folder_error(where: str, layer: int, folders: list[str]) -> SAELoadError:
    layers = sorted(int(f.split("_")[0]) for f in folders if re.match(r"^\d+_resid$", f))
    return SAELoadError(
        f"no folder {layer}_resid in {where}; layers available: {', '.join(map(str, layers)) or 'none'}"
    )


def _load_from_folder(root: Path, layer: int, checkpoint: int | None) -> TopKSAE:
    folder = root / f"{layer}_resid"
    if not folder.is_dir():
        raise _layer_folder_error(str(root), layer, [p.name for p in root.iterdir() if p.is_dir()])
    name = _choose(_checkpoints_in([p.name for p in folder.iterdir()]), checkpoint, str(folder))
    return load_checkpoint_file(folder / name, source=str(root), layer=layer)


def _hub_files(repo: str) -> list[str]:
    """Files of a hub repo: listed online, or read from the local HF cache offline."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return HfApi().list_repo_files(repo)
    except HFValidationError as error:
        raise SAELoadError(f"--sae {repo!r} is neither an existing path nor a hub repo id") from error
    except Exception:  # offline or unreachable: fall back to the cache
        pass
    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True, allow_patterns=["*_resid/*"]))
    except Exception as error:
        raise SAELoadError(
            f"hub repo {repo} is not reachable and not in the local Hugging Face cache: {error}"
        ) from error
    return [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]


def _load_from_hub(repo: str, layer: int, checkpoint: int | None) -> TopKSAE:
    from huggingface_hub import hf_hub_download

    files = _hub_files(repo)
    folders = sorted({f.split("/")[0] for f in files if "/" in f})
    if f"{layer}_resid" not in folders:
        raise _layer_folder_error(f"hub repo {repo}", layer, folders)
    in_layer = [f.split("/", 1)[1] for f in files if f.startswith(f"{layer}_resid/")]
    name = _choose(_checkpoints_in(in_layer), checkpoint, f"hub repo {repo}/{layer}_resid")
    try:
        path = hf_hub_download(repo, f"{layer}_resid/{name}")
    except Exception as error:
        raise SAELoadError(f"could not fetch {repo}/{layer}_resid/{name}: {error}") from error
    return load_checkpoint_file(path, source=repo, layer=layer)


def load_sae(source: str = DEFAULT_SAE_REPO, layer: int | None = None, checkpoint: int | None = None) -> TopKSAE:
    """Load one layer's SAE from a file, a hub-layout folder, or a hub repo id.

    The default checkpoint is the final one (the largest token count).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return load_checkpoint_file(path, layer=layer)
    if not path.is_dir() and (path.suffix in (".pt", ".safetensors") or source.startswith((".", "/", "~"))):
        raise SAELoadError(f"SAE file or folder {source} does not exist")
    if layer is None:
        raise SAELoadError(f"--sae {source} is a folder or repo: a layer is needed")
    if path.is_dir():
        return _load_from_folder(path, layer, checkpoint)
    return _load_from_hub(source, layer, checkpoint)


def load_saes(source: str, layers: list[int], checkpoint: int | None = None) -> dict[int, TopKSAE]:
    """One SAE per layer; a single file serves only a single layer."""
    if Path(source).expanduser().is_file() and len(layers) != 1:
        raise SAELoadError(f"--sae {source} is one file, but {len(layers)} layers were asked for")
    return {layer: load_sae(source, layer, checkpoint) for layer in layers}


def save_checkpoint(
    path: str | Path,
    pre_b: torch.Tensor,
    enc: torch.Tensor,
    dec: torch.Tensor,
    k: int,
    token_count: int,
    n_iter: int = 0,
    dead_latents: torch.Tensor | None = None,
) -> Path:
    """Write a checkpoint in exactly the released dict layout (used by `fit` and tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_features = enc.shape[1]
    blob = {
        "model_state_dict": {"pre_b": pre_b.detach().cpu().float(), "enc": enc.detach().cpu().float(),
                             "dec": dec.detach().cpu().float()},
        "d_in": enc.shape[0],
        "n_features": n_features,
        "k": int(k),
        "token_count": int(token_count),
        "n_iter": int(n_iter),
        "dead_latents": dead_latents if dead_latents is not None else torch.zeros(n_features),
        "log_id": path.stem,
    }
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(blob, partial)
    partial.replace(path)
    return path
