"""Streaming per-layer statistics and example lists, mergeable.

All state lives in tensors on the compute device and is updated per batch
with scatter/sort operations (no per-feature Python loops). Two states built
from disjoint data merge into the state of their union: counts and sums add,
example lists merge by the same deterministic order (activation descending,
then ordinal ascending), so one process, a resumed one and N Ray workers give
the same index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipscope_explorer.precompute.model.sae import SparseCode

HIST_LOW, HIST_HIGH, HIST_BINS = 1e-4, 1e4, 64
NO_ORDINAL = torch.iinfo(torch.long).max


def histogram_edges() -> torch.Tensor:
    """Fixed log-spaced edges shared by every feature of a layer (float64)."""
    return torch.logspace(
        torch.log10(torch.tensor(HIST_LOW)), torch.log10(torch.tensor(HIST_HIGH)), HIST_BINS + 1, dtype=torch.float64
    )


def sample_priority(ordinals: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A uniform (0, 1) number fixed by (image ordinal, feature): a 32-bit integer hash."""
    mask = 0xFFFFFFFF
    h = (ordinals & mask) ^ ((ordinals >> 32) * 0x27D4EB2F & mask)
    h = (h * 0x165667B1 + features * 0x3C6EF372 + 0x7F4A7C15) & mask
    for _ in range(3):
        h = h ^ (h >> 15)
        h = (h * 0x2C1B3C6D) & mask
        h = h ^ (h >> 13)
    return (h.double() + 0.5) / 4294967296.0


@dataclass
class ExampleList:
    """Per feature, up to C images ordered by `score` desc, then ordinal asc.

    score/ordinal/activation/cls: [F, C]; heat: [F, C, P] uint8 with scale [F, C].
    Empty slots have score -inf and ordinal NO_ORDINAL.
    """

    score: torch.Tensor
    ordinal: torch.Tensor
    activation: torch.Tensor
    cls: torch.Tensor
    heat: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def empty(cls, n_features: int, capacity: int, n_patches: int, device) -> ExampleList:
        shape = (n_features, capacity)
        return cls(
            score=torch.full(shape, float("-inf"), device=device, dtype=torch.float64),
            ordinal=torch.full(shape, NO_ORDINAL, device=device, dtype=torch.long),
            activation=torch.zeros(shape, device=device),
            cls=torch.zeros(shape, device=device),
            heat=torch.zeros(*shape, n_patches, device=device, dtype=torch.uint8),
            scale=torch.zeros(shape, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.score.shape[1]

    def winners(self, rows: torch.Tensor, score: torch.Tensor, ordinal: torch.Tensor) -> torch.Tensor:
        """For `rows`, merge current entries with candidates [R, M]; return source slots [R, C].

        Slot s < C is an existing entry, s >= C is candidate s - C.
        """
        all_score = torch.cat([self.score[rows], score], dim=1)
        all_ordinal = torch.cat([self.ordinal[rows], ordinal], dim=1)
        by_ordinal = torch.argsort(all_ordinal, dim=1, stable=True)
        by_score = torch.argsort(torch.gather(all_score, 1, by_ordinal), dim=1, descending=True, stable=True)
        return torch.gather(by_ordinal, 1, by_score)[:, : self.capacity]

    def take(self, rows: torch.Tensor, source: torch.Tensor, fresh: dict, fresh_index: torch.Tensor) -> None:
        """Set rows to the winners: slots < C from self, others from flat `fresh` arrays.

        fresh: {field: [M, ...]}; fresh_index [R, C] locates each new winner in them.
        """
        capacity = self.capacity
        old = source < capacity
        old_slot = source.clamp(max=capacity - 1)
        pick = torch.where(old, 0, fresh_index)
        for name in FIELDS:
            mine = getattr(self, name)[rows]
            index = old_slot
            keep = old
            if mine.ndim == 3:
                index = old_slot[..., None].expand(-1, -1, mine.shape[2])
                keep = old[..., None]
            merged = torch.where(keep, torch.gather(mine, 1, index), fresh[name][pick])
            getattr(self, name)[rows] = merged

    def merge(self, other: ExampleList) -> None:
        n_rows, other_capacity = other.score.shape
        rows = torch.arange(n_rows, device=self.score.device)
        source = self.winners(rows, other.score, other.ordinal)
        fresh_index = rows[:, None] * other_capacity + (source - self.capacity).clamp(min=0)
        fresh = {name: getattr(other, name).flatten(0, 1) for name in FIELDS}
        self.take(rows, source, fresh, fresh_index)


FIELDS = ("score", "ordinal", "activation", "cls", "scale", "heat")


def quantise(heat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps [M, P] (>= 0) -> (uint8 [M, P], scale [M]) with value = byte * scale."""
    scale = heat.max(dim=1).values / 255.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (heat / safe[:, None]).round().clamp(0, 255).to(torch.uint8), scale


class LayerAccumulator:
    """Everything the index needs about one layer, accumulated batch by batch."""

    def __init__(self, n_features: int, n_tokens: int, top_n: int, band_samples: int, device, track_raw: bool = False):
        self.n_features, self.n_tokens = n_features, n_tokens
        self.device = torch.device(device)
        f, t, d = n_features, n_tokens, self.device
        self.edges = histogram_edges().to(d)
        self.counts = {  # int64 totals
            "images": torch.zeros((), dtype=torch.long, device=d),
            "tokens": torch.zeros((), dtype=torch.long, device=d),
            "fired": torch.zeros((), dtype=torch.long, device=d),
            "nonpositive_kept": torch.zeros((), dtype=torch.long, device=d),
            "fire_tokens": torch.zeros(f, dtype=torch.long, device=d),
            "fire_images": torch.zeros(f, dtype=torch.long, device=d),
            "fire_cls": torch.zeros(f, dtype=torch.long, device=d),
            "histogram": torch.zeros(f, HIST_BINS, dtype=torch.long, device=d),
        }
        self.sums = {  # float64 totals
            "activation": torch.zeros(f, dtype=torch.float64, device=d),
            "position": torch.zeros(f, t, dtype=torch.float64, device=d),
            "sq_error_by_position": torch.zeros(t, dtype=torch.float64, device=d),
            "explained_variance": torch.zeros((), dtype=torch.float64, device=d),
        }
        if track_raw:
            self.sums["sq_error_raw"] = torch.zeros((), dtype=torch.float64, device=d)
            self.sums["explained_variance_raw"] = torch.zeros((), dtype=torch.float64, device=d)
        self.max_activation = torch.zeros(f, device=d)
        self.top = ExampleList.empty(f, top_n, t - 1, d)
        self.samples = ExampleList.empty(f, band_samples, t - 1, d)

    # ------------------------------------------------------------ update

    @torch.inference_mode()
    def update(
        self,
        code: SparseCode,
        ordinals: torch.Tensor,
        sq_error: torch.Tensor,
        explained: torch.Tensor,
        raw: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Add one batch: code [B, T, k], ordinals [B], per-token sq_error and explained [B, T].

        Returns a bool mask [B] of the images that entered some example list.
        """
        values, indices = code.values.to(self.device), code.indices.to(self.device)
        ordinals = ordinals.to(self.device)
        batch, tokens, _ = values.shape
        f = self.n_features
        fires = values > 0
        c, s = self.counts, self.sums
        c["images"] += batch
        c["tokens"] += batch * tokens
        c["nonpositive_kept"] += (~fires).sum()
        c["fired"] += fires.sum()
        s["sq_error_by_position"] += sq_error.to(self.device, torch.float64).sum(0)
        s["explained_variance"] += explained.to(self.device, torch.float64).sum()
        if raw is not None:
            s["sq_error_raw"] += raw[0].to(self.device, torch.float64).sum()
            s["explained_variance_raw"] += raw[1].to(self.device, torch.float64).sum()

        b_idx, t_idx, _ = torch.nonzero(fires, as_tuple=True)
        feat, val = indices[fires], values[fires]
        c["fire_tokens"] += torch.bincount(feat, minlength=f)
        c["fire_cls"] += torch.bincount(feat[t_idx == 0], minlength=f)
        s["activation"].index_add_(0, feat, val.double())
        s["position"].view(-1).index_add_(0, feat * tokens + t_idx, val.double())
        bins = (torch.searchsorted(self.edges, val.double(), right=True) - 1).clamp(0, HIST_BINS - 1)
        c["histogram"].view(-1).index_add_(0, feat * HIST_BINS + bins, torch.ones_like(bins))

        image_max = torch.zeros(batch * f, device=self.device)
        image_max.scatter_reduce_(0, b_idx * f + feat, val, reduce="amax")
        image_max = image_max.view(batch, f)
        present = image_max > 0
        c["fire_images"] += present.sum(0)
        torch.maximum(self.max_activation, image_max.max(0).values, out=self.max_activation)

        context = (values, indices, fires, ordinals)
        entered = torch.zeros(batch, dtype=torch.bool, device=self.device)
        top_score = torch.where(present, image_max, float("-inf")).double().T  # [F, B]
        entered |= self._offer(self.top, top_score, image_max, context)
        key = torch.log(sample_priority(ordinals[:, None], torch.arange(f, device=self.device)[None])) / image_max
        sample_score = torch.where(present, key, float("-inf")).T  # Efraimidis-Spirakis weighted keys
        entered |= self._offer(self.samples, sample_score, image_max, context)
        return entered.cpu()

    def _offer(self, examples: ExampleList, score_fb: torch.Tensor, image_max: torch.Tensor, context) -> torch.Tensor:
        """Offer the batch's images to an example list; return the mask [B] of those that entered."""
        values, indices, fires, ordinals = context
        entered = torch.zeros(len(ordinals), dtype=torch.bool, device=self.device)
        floor = examples.score[:, -1]
        rows = torch.nonzero(
            (score_fb.max(1).values >= floor) & (score_fb.max(1).values > float("-inf")), as_tuple=True
        )[0]
        if rows.numel() == 0:
            return entered
        cand_ordinal = torch.where(score_fb[rows] > float("-inf"), ordinals[None, :].expand(len(rows), -1), NO_ORDINAL)
        source = examples.winners(rows, score_fb[rows], cand_ordinal)
        new = source >= examples.capacity
        r_new, slot_new = torch.nonzero(new, as_tuple=True)
        if r_new.numel() == 0:
            return entered
        b_new = source[r_new, slot_new] - examples.capacity
        f_new = rows[r_new]
        heat, cls = self._heatmaps(values, indices, fires, b_new, f_new)
        q, scale = quantise(heat)
        fresh = {
            "score": score_fb[f_new, b_new],
            "ordinal": ordinals[b_new],
            "activation": image_max[b_new, f_new],
            "cls": cls,
            "heat": q,
            "scale": scale,
        }
        fresh_index = torch.zeros_like(source)
        fresh_index[r_new, slot_new] = torch.arange(len(r_new), device=self.device)
        examples.take(rows, source, fresh, fresh_index)
        entered[b_new] = True
        return entered

    def _heatmaps(self, values, indices, fires, b_sel, f_sel) -> tuple[torch.Tensor, torch.Tensor]:
        """Firing values of feature f_sel[i] on every token of image b_sel[i]: ([M, P], cls [M])."""
        batch, tokens, _ = values.shape
        pair = torch.full((batch, self.n_features), -1, dtype=torch.long, device=self.device)
        pair[b_sel, f_sel] = torch.arange(len(b_sel), device=self.device)
        slot = torch.where(fires, pair.gather(1, indices.reshape(batch, -1)).view_as(indices), -1)
        hit_b, hit_t, hit_j = torch.nonzero(slot >= 0, as_tuple=True)
        dense = torch.zeros(len(b_sel), tokens, device=self.device)
        dense[slot[hit_b, hit_t, hit_j], hit_t] = values[hit_b, hit_t, hit_j]
        return dense[:, 1:], dense[:, 0]

    # ------------------------------------------------------------ merge / save

    def merge(self, other: LayerAccumulator) -> None:
        for name, tensor in self.counts.items():
            tensor += other.counts[name].to(self.device)
        for name, tensor in self.sums.items():
            tensor += other.sums[name].to(self.device)
        torch.maximum(self.max_activation, other.max_activation.to(self.device), out=self.max_activation)
        self.top.merge(_moved(other.top, self.device))
        self.samples.merge(_moved(other.samples, self.device))

    def state_bytes(self) -> int:
        """Bytes of the accumulated state: what a checkpoint holds, allocated whole (and zero-filled) when the
        accumulator is made; it does not grow with the images seen."""
        tensors = [
            *self.counts.values(),
            *self.sums.values(),
            self.max_activation,
            *vars(self.top).values(),
            *vars(self.samples).values(),
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def referenced(self) -> set[int]:
        """Ordinals of every image held in an example list."""
        ordinals = torch.cat([self.top.ordinal.flatten(), self.samples.ordinal.flatten()])
        return set(ordinals[ordinals != NO_ORDINAL].unique().tolist())

    def state_dict(self) -> dict:
        return {
            "shape": (self.n_features, self.n_tokens, self.top.capacity, self.samples.capacity),
            "counts": {k: v.cpu() for k, v in self.counts.items()},
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "max_activation": self.max_activation.cpu(),
            "top": {k: v.cpu() for k, v in vars(self.top).items()},
            "samples": {k: v.cpu() for k, v in vars(self.samples).items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict, device) -> LayerAccumulator:
        n_features, n_tokens, top_n, band_samples = state["shape"]
        acc = cls(n_features, n_tokens, top_n, band_samples, device, track_raw="sq_error_raw" in state["sums"])
        acc.counts = {k: v.to(acc.device) for k, v in state["counts"].items()}
        acc.sums = {k: v.to(acc.device) for k, v in state["sums"].items()}
        acc.max_activation = state["max_activation"].to(acc.device)
        acc.top = ExampleList(**{k: v.to(acc.device) for k, v in state["top"].items()})
        acc.samples = ExampleList(**{k: v.to(acc.device) for k, v in state["samples"].items()})
        return acc


def predicted_state_bytes(
    n_features: int, n_tokens: int, top_n: int, band_samples: int, track_raw: bool = False
) -> int:
    """`state_bytes()` of a layer accumulator of this shape, computed without allocating it."""
    return LayerAccumulator(n_features, n_tokens, top_n, band_samples, "meta", track_raw).state_bytes()


def _moved(examples: ExampleList, device) -> ExampleList:
    return ExampleList(**{k: v.to(device) for k, v in vars(examples).items()})
