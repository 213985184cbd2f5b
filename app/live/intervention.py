"""An intervention on an upload, the torch-free half: the request's fields checked, and what the edited run
changed, against the upload's own (unedited) codes and embedding.

- `parse_intervention` reads `layer`, `feature`, `scale`, `patches`, `prompts`, `template` and `top`, and
  refuses anything else than what the edit can use (422, one line; `UploadRejected`).
- `intervention_result` compares, on each layer after the edited one, every feature's activation on the
  image (max over all tokens, the index's definition) without and with the edit, and CLIP's own view:
  the cosine of the final image embedding with text prompts, before and after.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel

from clipscope_explorer.app.live.input import UploadRejected, whole_number
from clipscope_explorer.app.live.neighbours import zero_shot_labels
from clipscope_explorer.app.meaning.prompts import DEFAULT_TEMPLATE, MAX_QUERY_CHARS, check_template, clean_text
from clipscope_explorer.app.meaning.service import MeaningService, MeaningUnavailable
from clipscope_explorer.app.models import round_sig, rounded_list
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls
from clipscope_explorer.precompute.index.image_features import image_features

MAX_SCALE = 10.0
MAX_PROMPTS = 16
DEFAULT_CHANGES, MAX_CHANGES = 20, 200
Codes = dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (values [T, k], indices [T, k])


@dataclass(frozen=True)
class InterventionRequest:
    """What to edit: `patches` are patch indices (row-major, CLS excluded), None for every token (CLS
    included); `prompts` None for the upload's zero-shot labels."""

    layer: int
    feature: int
    scale: float
    patches: tuple[int, ...] | None
    prompts: tuple[str, ...] | None
    template: str | None
    top: int

    @property
    def tokens(self) -> tuple[int, ...] | None:
        """The edited tokens: 0 is CLS, patch p is token p + 1."""
        return None if self.patches is None else tuple(p + 1 for p in self.patches)

    def identity(self, upload_id: str) -> str:
        """The intervention's id: a hash of the upload and everything that decides the result."""
        blob = json.dumps([upload_id, asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _last(fields: dict[str, list[str]], name: str) -> str | None:
    values = fields.get(name)
    return values[-1] if values else None


def _whole(fields, name: str, default: int | None = None) -> int:
    text = (_last(fields, name) or "").strip()
    if not text and default is not None:
        return default
    number = whole_number(text, max_digits=9)
    if number is None:
        raise UploadRejected(422, f"{name} must be a whole number, not {text[:20]!r}" if text else f"{name} is missing")
    return number


def _scale(text: str | None) -> float:
    text = (text or "").strip()
    if not text:
        return 0.0
    try:
        scale = float(text[:40])
    except ValueError:
        scale = math.nan
    if not -MAX_SCALE <= scale <= MAX_SCALE:  # NaN, infinities and words fail here too
        raise UploadRejected(422, f"scale must be a number in [-10, 10], not {text[:20]!r}")
    return scale + 0.0  # -0.0 is 0.0


def _patches(text: str | None, n_patches: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise UploadRejected(422, "patches is empty: omit it to edit every token, or list patch indices such as 0,1,16")
    patches = set()
    for part in parts:
        patch = whole_number(part, max_digits=6)
        if patch is None or patch >= n_patches:
            raise UploadRejected(422, f"patches: {part[:20]!r} is not a patch index in 0..{n_patches - 1}")
        patches.add(patch)
    return tuple(sorted(patches))


def _prompts(text: str | None) -> tuple[str, ...] | None:
    lines = [clean_text(line) for line in (text or "").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    if len(lines) > MAX_PROMPTS:
        raise UploadRejected(422, f"prompts: at most {MAX_PROMPTS} (one per line), not {len(lines)}")
    long = next((line for line in lines if len(line) > MAX_QUERY_CHARS), None)
    if long is not None:
        raise UploadRejected(422, f"prompts: each at most {MAX_QUERY_CHARS} characters ({long[:20]!r}... is longer)")
    return tuple(lines)


def parse_intervention(fields: dict[str, list[str]], n_features: dict[int, int], n_patches: int) -> InterventionRequest:
    """The request's fields checked; `n_features`: the features of each layer that can be edited here."""
    layer = _whole(fields, "layer")
    if layer not in n_features:
        available = ", ".join(map(str, sorted(n_features)))
        raise UploadRejected(422, f"layer {layer} cannot be edited here; layers: {available}")
    feature = _whole(fields, "feature")
    if feature >= n_features[layer]:
        raise UploadRejected(
            422, f"feature {feature} does not exist at layer {layer}: features are 0..{n_features[layer] - 1}"
        )
    template = _last(fields, "template")
    if template is not None and template.strip():
        if len(template) > MAX_QUERY_CHARS:
            raise UploadRejected(422, f"template: at most {MAX_QUERY_CHARS} characters")
        try:
            template = check_template(template)
        except ValueError as error:
            raise UploadRejected(422, f"template: {error}") from None
    else:
        template = None
    top = _whole(fields, "top", DEFAULT_CHANGES)
    if not 1 <= top <= MAX_CHANGES:
        raise UploadRejected(422, f"top must be in 1..{MAX_CHANGES}")
    return InterventionRequest(
        layer=layer,
        feature=feature,
        scale=_scale(_last(fields, "scale")),
        patches=_patches(_last(fields, "patches"), n_patches),
        prompts=_prompts(_last(fields, "prompts")),
        template=template,
        top=top,
    )


# ---------------------------------------------------------------------------------------------- the result


class FeatureChange(BaseModel):
    """A feature whose activation on the image (max over all tokens) moved; heatmaps per patch."""

    feature: int
    before: float
    after: float
    heatmap_before: list[float]
    heatmap_after: list[float]
    label: str | None = None
    url: str | None = None


class LayerChanges(BaseModel):
    layer: int
    in_index: bool
    changed: int  # features whose activation moved at all
    changes: list[FeatureChange]  # the largest moves, by |after - before| (ties: lower feature first)


class PromptScore(BaseModel):
    """Cosine of CLIP's final image embedding with a prompt's text embedding (null: no text embedding)."""

    text: str
    before: float | None
    after: float | None


class EditedFeature(BaseModel):
    """The edited feature at its own layer: its activation before, and when the edited stream is encoded
    again; how many tokens were chosen and how many of those it fires on (the tokens changed)."""

    label: str | None
    url: str | None
    tokens: int
    tokens_changed: int
    before: float
    after: float
    heatmap_before: list[float]
    heatmap_after: list[float]


class InterventionResult(BaseModel):
    intervention_id: str
    url: str | None
    json_url: str | None
    upload_id: str
    upload_url: str | None
    image_url: str | None
    grid: list[int]
    layer: int
    feature: int
    scale: float
    patches: list[int] | None
    edited: EditedFeature
    note: str | None
    layers: dict[str, LayerChanges]
    template: str
    prompts: list[PromptScore]
    prompts_note: str | None


def feature_firing(values: np.ndarray, indices: np.ndarray, feature: int) -> np.ndarray:
    """[T] the feature's value where it fires (kept and > 0), else 0."""
    return firing_maps(values, indices, [feature])[0]


def firing_maps(values: np.ndarray, indices: np.ndarray, features: list[int]) -> np.ndarray:
    """[len(features), T] each feature's value on each token where it fires (kept and > 0), else 0."""
    values = np.asarray(values, dtype=np.float32)
    kept = (np.asarray(indices)[..., None] == np.asarray(features, dtype=np.int64)) & (values > 0)[..., None]
    return np.where(kept, values[..., None], np.float32(0)).sum(axis=1).T


def layer_changes(
    index: Index, urls: Urls, layer: int, before: tuple, after: tuple, in_index: bool, top: int
) -> LayerChanges:
    old, new = image_features(*before), image_features(*after)
    features = np.union1d(old.features, new.features)
    activation = {}
    for name, summary in (("before", old), ("after", new)):
        value = np.zeros(len(features), dtype=np.float32)
        value[np.searchsorted(features, summary.features)] = summary.activation
        activation[name] = value
    delta = activation["after"].astype(np.float64) - activation["before"]
    moved = np.nonzero(delta != 0)[0]
    chosen = moved[np.lexsort((features[moved], -np.abs(delta[moved])))][:top]

    ids = [int(features[c]) for c in chosen]
    maps = {name: firing_maps(*codes, ids) for name, codes in (("before", before), ("after", after))}
    known = in_index and layer in index.layers
    rows = index.summaries(layer, [f for f in ids if f < index.layers[layer]["n_features"]]) if known and ids else {}
    return LayerChanges(
        layer=layer,
        in_index=known,
        changed=len(moved),
        changes=[
            FeatureChange(
                feature=feature,
                before=round_sig(float(activation["before"][c])),
                after=round_sig(float(activation["after"][c])),
                heatmap_before=rounded_list(maps["before"][n][1:]),
                heatmap_after=rounded_list(maps["after"][n][1:]),
                label=rows.get(feature, {}).get("label"),
                url=urls.feature(layer, feature) if feature in rows else None,
            )
            for n, (c, feature) in enumerate(zip(chosen, ids))
        ],
    )


def _text_vector(index: Index, meaning: MeaningService, text: str, template: str) -> np.ndarray:
    """The prompt's text embedding: the index's own for a vocabulary term under its zero-shot template (no
    text tower needed), else CLIP's text tower's (MeaningUnavailable when it is not loaded)."""
    if template == (index.meta.get("zero_shot") or {}).get("template"):
        terms, matrix = index.vocabulary()
        row = bisect.bisect_left(terms, text)
        if row < len(terms) and terms[row] == text:
            vector = matrix[row].astype(np.float64)
            return vector / np.linalg.norm(vector)
    vector, _ = meaning.embed(text, template)
    return np.asarray(vector, dtype=np.float64)


def prompt_scores(
    index: Index,
    meaning: MeaningService,
    prompts: tuple[str, ...] | None,
    template: str,
    before: np.ndarray | None,
    after: np.ndarray | None,
) -> tuple[list[PromptScore], str | None]:
    """Each prompt's cosine with the image embedding before and after the edit, and a note when some cannot
    be scored. Default prompts: the unedited image's zero-shot labels."""
    if before is None or after is None:
        return [], "CLIP's image embedding is not computed here: the live model is not the index's."
    texts = list(prompts) if prompts is not None else [z.text for z in zero_shot_labels(index, before)]
    if not texts:
        return [], "This index has no zero-shot vocabulary: give prompts to see CLIP's view."
    scores, note = [], None
    for text in texts:
        try:
            vector = _text_vector(index, meaning, text, template)
        except MeaningUnavailable as error:
            why = error.status.message or "it is not loaded here."
            note = f"Prompts outside the index's zero-shot vocabulary need CLIP's text tower: {why}"
            scores.append(PromptScore(text=text, before=None, after=None))
            continue
        cosine = [round_sig(float(np.dot(np.asarray(e, dtype=np.float64), vector))) for e in (before, after)]
        scores.append(PromptScore(text=text, before=cosine[0], after=cosine[1]))
    return scores, note


def intervention_result(
    index: Index,
    urls: Urls,
    meaning: MeaningService,
    upload_id: str,
    intervention_id: str,
    stored: bool,
    grid: tuple[int, int],
    request: InterventionRequest,
    before: Codes,
    before_embedding: np.ndarray | None,
    after: Codes,
    after_embedding: np.ndarray | None,
    firing: np.ndarray,
    index_layers: tuple[int, ...],
) -> InterventionResult:
    """The result of an edited run (`after`: the edited layer and every later one; `firing`: the feature's
    value per token at the edited layer before the edit) against the upload's codes (`before`)."""
    layer, feature = request.layer, request.feature
    firing_after = feature_firing(*after[layer], feature)
    chosen = (
        np.ones(len(firing), dtype=bool) if request.tokens is None else np.isin(np.arange(len(firing)), request.tokens)
    )
    changed = int(((firing > 0) & chosen).sum())
    in_index = layer in index_layers and layer in index.layers
    row = (
        index.summaries(layer, [feature]).get(feature, {})
        if in_index and feature < index.layers[layer]["n_features"]
        else {}
    )
    template = prompt_template(index, request)
    prompts, prompts_note = prompt_scores(index, meaning, request.prompts, template, before_embedding, after_embedding)
    note = None
    if changed == 0 or request.scale == 1:
        why = (
            f"feature {feature} does not fire on the chosen tokens at layer {layer}"
            if changed == 0
            else "the scale is 1"
        )
        note = f"The edit adds nothing ({why}): the edited run is the unedited one."
    url = urls.intervention(upload_id, intervention_id) if stored else None
    return InterventionResult(
        intervention_id=intervention_id,
        url=url,
        json_url=urls.twin(url) if url else None,
        upload_id=upload_id,
        upload_url=urls.upload_result(upload_id) if stored else None,
        image_url=urls.upload_image(upload_id) if stored else None,
        grid=list(grid),
        layer=layer,
        feature=feature,
        scale=request.scale,
        patches=None if request.patches is None else list(request.patches),
        edited=EditedFeature(
            label=row.get("label"),
            url=urls.feature(layer, feature) if row else None,
            tokens=int(chosen.sum()),
            tokens_changed=changed,
            before=round_sig(float(firing.max())),
            after=round_sig(float(firing_after.max())),
            heatmap_before=rounded_list(firing[1:]),
            heatmap_after=rounded_list(firing_after[1:]),
        ),
        note=note,
        layers={
            str(n): layer_changes(index, urls, n, before[n], after[n], n in index_layers, request.top)
            for n in sorted(after)
            if n > layer
        },
        template=template,
        prompts=prompts,
        prompts_note=prompts_note,
    )


def prompt_template(index: Index, request: InterventionRequest) -> str:
    """The template prompts are put in: the request's, else the index's zero-shot template."""
    return request.template or (index.meta.get("zero_shot") or {}).get("template") or DEFAULT_TEMPLATE
