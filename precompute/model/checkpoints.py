"""SAE checkpoints of the CLIP-Scope release: find, read, validate, write.

Sources: a hub repo (``{layer}_resid/{token_count}.pt``, online or from the
local Hugging Face cache), a local folder with the same layout, one ``.pt``
file in the released dict layout, or a ``.safetensors`` file with tensors
``pre_b``, ``enc``, ``dec`` (``k`` in its metadata). The default checkpoint
is the final one (the largest token count). Every error names the file.
What is built is chosen at load time: the whole SAE (`purpose="full"`), or an
encoder that never holds a decoder (`purpose="encode"`, float32 or bf16 weights).
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from clipscope_explorer.precompute.model.release import DEFAULT_SAE_REPO, RELEASED_K
from clipscope_explorer.precompute.model.sae import SAEEncoder, SAELoadError, SAESource, TopKSAE

CHECKPOINT_NAME = re.compile(r"^(\d+)\.(pt|safetensors)$")

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
        return _Checkpoint(
            tensors,
            header.get("d_in"),
            header.get("n_features"),
            header.get("k", RELEASED_K),
            header.get("token_count"),
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as error:
        raise SAELoadError(f"SAE file {path} is corrupt or not a torch checkpoint: {error}") from error
    missing = [key for key in RELEASED_KEYS if not isinstance(blob, dict) or key not in blob]
    if missing:
        raise SAELoadError(f"SAE file {path} lacks key(s) {missing}")
    token_count = blob.get("token_count")
    return _Checkpoint(
        blob["model_state_dict"],
        int(blob["d_in"]),
        int(blob["n_features"]),
        int(blob["k"]),
        int(token_count) if token_count is not None else None,
    )


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


PURPOSES = ("full", "encode")


def load_checkpoint_file(
    path: str | Path,
    source: str | None = None,
    layer: int | None = None,
    *,
    purpose: str = "full",
    weights_precision: str = "fp32",
    device: torch.device | str = "cpu",
) -> TopKSAE | SAEEncoder:
    """Load one checkpoint file (.pt in the released layout, or .safetensors) onto `device`.

    purpose `full`: a TopKSAE (encode and decode, float32 as released). purpose `encode`: an SAEEncoder,
    which never holds the decoder, with its encoder stored in `weights_precision` (`fp32` or `bf16`).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
    if purpose == "full" and weights_precision != "fp32":
        raise ValueError("a full SAE keeps the released float32 weights: other precisions are for purpose='encode'")
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
    if purpose == "encode":
        return SAEEncoder(pre_b, enc, k, origin, weights_precision=weights_precision, device=device)
    return TopKSAE(pre_b, enc, dec, k, origin, device=device)


class DecoderRows:
    """The decoder [n_features, d_in] of one checkpoint file, memory-mapped: a row is read from the file when
    asked for, so holding the decoder costs no memory until rows are used, and the pages read are shared by
    every process that maps the same file. A .pt file saved in torch's zip layout (the release's) and a
    .safetensors file map; an older .pt is read whole (its decoder alone is kept). Errors name the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SAELoadError(f"SAE file {self.path} does not exist")
        if self.path.suffix == ".safetensors":
            self._matrix = self._safetensors_slice()
            shape = self._matrix.get_shape()
        else:
            self._matrix = self._torch_tensor()
            shape = self._matrix.shape
        if len(shape) != 2:
            raise SAELoadError(f"SAE file {self.path}: dec has shape {tuple(shape)}, not [n_features, d_in]")
        self.n_features, self.d_in = (int(n) for n in shape)

    def _safetensors_slice(self):
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(self.path), framework="pt")
            self._handle = handle  # the slice reads through it
            return handle.get_slice("dec")
        except (SafetensorError, OSError, ValueError) as error:
            raise SAELoadError(f"SAE file {self.path}: no readable decoder `dec`: {error}") from error

    def _torch_tensor(self) -> torch.Tensor:
        try:
            try:
                blob = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not torch's zip layout: it cannot map
                blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            RuntimeError,
            EOFError,
            OSError,
            ValueError,
            struct.error,
        ) as error:
            raise SAELoadError(f"SAE file {self.path} is corrupt or not a torch checkpoint: {error}") from error
        dec = (blob.get("model_state_dict") or {}).get("dec") if isinstance(blob, dict) else None
        if not isinstance(dec, torch.Tensor):
            raise SAELoadError(f"SAE file {self.path} has no decoder matrix `dec` in its state dict")
        return dec

    def row(self, feature: int) -> torch.Tensor:
        """Feature `feature`'s decoder row [d_in], float32 (a copy)."""
        if not 0 <= feature < self.n_features:
            raise IndexError(f"feature {feature} is not in 0..{self.n_features - 1}")
        return self._matrix[feature : feature + 1][0].to(torch.float32).clone()

    def check_fits(self, encoder: SAEEncoder) -> None:
        if (self.n_features, self.d_in) != (encoder.n_features, encoder.d_in):
            raise SAELoadError(
                f"SAE file {self.path}: dec is {self.n_features} x {self.d_in}, "
                f"but the encoder has {encoder.n_features} features of width {encoder.d_in}"
            )


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


def _file_in_folder(root: Path, layer: int, checkpoint: int | None) -> Path:
    folder = root / f"{layer}_resid"
    if not folder.is_dir():
        raise _layer_folder_error(str(root), layer, [p.name for p in root.iterdir() if p.is_dir()])
    return folder / _choose(_checkpoints_in([p.name for p in folder.iterdir()]), checkpoint, str(folder))


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


def _file_in_hub(repo: str, layer: int, checkpoint: int | None) -> Path:
    from huggingface_hub import hf_hub_download

    files = _hub_files(repo)
    folders = sorted({f.split("/")[0] for f in files if "/" in f})
    if f"{layer}_resid" not in folders:
        raise _layer_folder_error(f"hub repo {repo}", layer, folders)
    in_layer = [f.split("/", 1)[1] for f in files if f.startswith(f"{layer}_resid/")]
    name = _choose(_checkpoints_in(in_layer), checkpoint, f"hub repo {repo}/{layer}_resid")
    try:
        return Path(hf_hub_download(repo, f"{layer}_resid/{name}"))
    except Exception as error:
        raise SAELoadError(f"could not fetch {repo}/{layer}_resid/{name}: {error}") from error


def find_checkpoint(source: str, layer: int | None = None, checkpoint: int | None = None) -> tuple[Path, str | None]:
    """The file to load for one layer, and the source to record (None: the file itself).

    The default checkpoint is the final one (the largest token count).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path, None
    if not path.is_dir() and (path.suffix in (".pt", ".safetensors") or source.startswith((".", "/", "~"))):
        raise SAELoadError(f"SAE file or folder {source} does not exist")
    if layer is None:
        raise SAELoadError(f"--sae {source} is a folder or repo: a layer is needed")
    if path.is_dir():
        return _file_in_folder(path, layer, checkpoint), str(path)
    return _file_in_hub(source, layer, checkpoint), source


def list_checkpoints(source: str, layer: int) -> list[int]:
    """The token counts of one layer's checkpoints in a hub-layout folder or hub repo, in training order
    (SAELoadError when the source or its layer folder cannot be read). A single file is not listed here: it
    is its own one checkpoint."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / f"{layer}_resid"
        if not folder.is_dir():
            raise _layer_folder_error(str(path), layer, [p.name for p in path.iterdir() if p.is_dir()])
        return sorted(_checkpoints_in([p.name for p in folder.iterdir()]))
    if path.is_file():
        raise SAELoadError(f"{source} is one SAE file, not a folder of checkpoints")
    if path.suffix in (".pt", ".safetensors") or source.startswith((".", "/", "~")):
        raise SAELoadError(f"SAE folder {source} does not exist")
    files = _hub_files(source)
    return sorted(_checkpoints_in([f.split("/", 1)[1] for f in files if f.startswith(f"{layer}_resid/")]))


def load_sae(
    source: str = DEFAULT_SAE_REPO,
    layer: int | None = None,
    checkpoint: int | None = None,
    *,
    purpose: str = "full",
    weights_precision: str = "fp32",
    device: torch.device | str = "cpu",
) -> TopKSAE | SAEEncoder:
    """Load one layer's SAE from a file, a hub-layout folder, or a hub repo id (see `find_checkpoint`);
    `purpose`, `weights_precision` and `device` as in `load_checkpoint_file`."""
    path, recorded = find_checkpoint(source, layer, checkpoint)
    return load_checkpoint_file(
        path, recorded, layer, purpose=purpose, weights_precision=weights_precision, device=device
    )


def load_saes(
    source: str, layers: list[int], checkpoint: int | None = None, device: torch.device | str = "cpu"
) -> dict[int, TopKSAE]:
    """One whole SAE per layer; a single file serves only a single layer."""
    if Path(source).expanduser().is_file() and len(layers) != 1:
        raise SAELoadError(f"--sae {source} is one file, but {len(layers)} layers were asked for")
    return {layer: load_sae(source, layer, checkpoint, device=device) for layer in layers}


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
        "model_state_dict": {
            "pre_b": pre_b.detach().cpu().float(),
            "enc": enc.detach().cpu().float(),
            "dec": dec.detach().cpu().float(),
        },
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
