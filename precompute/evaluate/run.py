"""`clipscope-explorer evaluate`: the sort evaluation of an index's layers, written into the index.

Per layer: `seeds` x `pairs` trials among the first `features` live features (the release: 650 features,
450 pairs, 4 seeds), the same trials with random grids (the null control), and with `per_feature` N, N trials
for every live feature against random partners (its own score). Trials are drawn from fixed seeds, so a
rerun plans the same ones: the openai judge answers them from its disk cache, which makes an interrupted run
resumable. The results replace the index's earlier ones of the same layer, token mode and judge; the file is
rewritten atomically (IndexUpdater), in place or into `out`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np

from clipscope_explorer.precompute.evaluate import sort_eval
from clipscope_explorer.precompute.evaluate.judging import Judge
from clipscope_explorer.precompute.evaluate.sort_eval import PlannedTrial
from clipscope_explorer.precompute.index.check import IndexCheckError, check_index_file, first_line

log = logging.getLogger(__name__)

TABLES = ("sort_eval", "sort_eval_features", "sort_eval_trials")
TOKENS = ("cls", "image")
JUDGES = ("embedding", "openai")


class EvaluateError(ValueError):
    """The evaluation cannot run on this index as asked (one line naming the index and what to do)."""


@dataclass(frozen=True)
class SortEvalOptions:
    index: Path
    out: Path | None = None
    layers: list[int] | None = None  # default: every layer of the index
    token: str = "cls"
    judge: str = "embedding"
    pairs: int = 450
    seeds: int = 4
    features: int = 650  # the pairs are drawn among the first N live features
    per_feature: int = 0
    seed: int = 0
    judge_url: str | None = None
    judge_model: str | None = None  # openai: the chat model; embedding: another open_clip model (default: stored)
    judge_pretrained: str | None = None  # embedding judge: the pretrained tag of a built-in open_clip name
    device: str = "auto"  # where a model runs (the embedding judge's; the index's in the image token mode)
    sae: str | None = None  # image token mode: a local copy of the index's SAE source
    judge_key_env: str = "OPENAI_API_KEY"
    judge_concurrency: int = 8
    judge_timeout: float = 60.0
    judge_retries: int = 4
    judge_cache: Path | None = None  # default: INDEX.judge-cache beside the index
    images_root: Path | None = None
    progress: bool = True


@dataclass
class LayerRun:
    layer: int
    pairs: list[PlannedTrial]
    null: list[PlannedTrial]
    per_feature: list[PlannedTrial]
    replaced: int
    considered: int


def plan_layer(con, layer: int, n_features: int, n_samples: int, options: SortEvalOptions, encoder=None) -> LayerRun:
    start = time.perf_counter()
    if options.token == "image":
        from clipscope_explorer.precompute.evaluate.image_firing import ImageFiring

        firing = ImageFiring(con, layer, n_features, lambda image: encoder(image, layer))
    else:
        firing = sort_eval.cls_firing(con, layer, n_features)
    live = firing.live()
    log.info("layer %d: firing read, %d live features, in %.1f s", layer, len(live), time.perf_counter() - start)
    start = time.perf_counter()
    considered = live[: options.features] if options.features else live
    pairs, replaced = [], 0
    for seed in range(options.seeds):
        planned, count = sort_eval.plan_pairs(firing, considered, options.pairs, seed, _run_seed(options, layer))
        pairs += planned
        replaced += count
    per_feature, given_up = sort_eval.plan_per_feature(firing, live, options.per_feature, _run_seed(options, layer))
    null = sort_eval.null_trials(pairs, n_samples, _run_seed(options, layer))
    log.info(
        "layer %d: %d trials planned in %.1f s (%d pairs replaced, %d per-feature trials without a query)",
        layer,
        len(pairs) + len(null) + len(per_feature),
        time.perf_counter() - start,
        replaced,
        given_up,
    )
    return LayerRun(layer, pairs, null, per_feature, replaced, len(considered))


def _run_seed(options: SortEvalOptions, layer: int) -> int:
    return options.seed * 1_000 + layer


def summary(run: LayerRun, answers: dict[str, list[int | None]], options: SortEvalOptions, judge: Judge) -> dict:
    """The `sort_eval` row of one layer."""
    main = sort_eval.score(run.pairs, answers["pairs"])
    null = sort_eval.score(run.null, answers["null"])
    low, high = sort_eval.wilson(main.correct, main.trials)
    return {
        "layer": run.layer,
        "token": options.token,
        "judge": judge.name,
        "judge_model": judge.model,
        "accuracy": main.accuracy,
        "ci_low": low if main.trials else None,
        "ci_high": high if main.trials else None,
        "answer_1_rate": main.answer_1_rate,
        "trials": main.trials,
        "correct": main.correct,
        "unanswered": main.unanswered,
        "replaced": run.replaced,
        "null_accuracy": null.accuracy,
        "null_trials": null.trials,
        "seeds": options.seeds,
        "pairs": options.pairs,
        "features_considered": run.considered,
        "per_feature": options.per_feature,
        "usage": json.dumps(judge.report()),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def trial_columns(run: LayerRun, answers: dict[str, list[int | None]], token: str, judge: str) -> dict:
    planned = [(kind, trial) for kind in ("pairs", "null", "feature") for trial in getattr(run, _field(kind))]
    given = [a for kind in ("pairs", "null", "feature") for a in answers[kind]]
    return {
        "layer": [run.layer] * len(planned),
        "token": [token] * len(planned),
        "judge": [judge] * len(planned),
        "kind": [kind for kind, _ in planned],
        "seed": [t.seed for _, t in planned],
        "trial": [t.trial for _, t in planned],
        "grid1_feature": [t.grid1_feature for _, t in planned],
        "grid2_feature": [t.grid2_feature for _, t in planned],
        "query_feature": [t.query_feature for _, t in planned],
        "query_image": [t.trial_images.query for _, t in planned],
        "answer": np.array([a if a in (1, 2) else None for a in given], dtype=object),
    }


def feature_columns(run: LayerRun, answers: dict[str, list[int | None]], token: str, judge: str) -> dict:
    """Per feature, its trials as the query's owner: the per-feature trials, else the pairs'."""
    kind = "feature" if run.per_feature else "pairs"
    rows = list(sort_eval.per_feature_scores(getattr(run, _field(kind)), answers[kind]))
    return {
        "layer": [run.layer] * len(rows),
        "feature": [f for f, _, _ in rows],
        "token": [token] * len(rows),
        "judge": [judge] * len(rows),
        "trials": [n for _, n, _ in rows],
        "correct": [c for _, _, c in rows],
    }


def _field(kind: str) -> str:
    return {"pairs": "pairs", "null": "null", "feature": "per_feature"}[kind]


def answer_layer(run: LayerRun, judge: Judge) -> dict[str, list[int | None]]:
    """The judge's answers to every trial of the layer, asked in one batch (a service judge runs them
    concurrently), by kind."""
    trials = [t.trial_images for kind in ("pairs", "null", "feature") for t in getattr(run, _field(kind))]
    start = time.perf_counter()
    answers = judge.answer(trials)
    log.info("layer %d: %d trials judged in %.1f s", run.layer, len(trials), time.perf_counter() - start)
    out, at = {}, 0
    for kind in ("pairs", "null", "feature"):
        count = len(getattr(run, _field(kind)))
        out[kind], at = answers[at : at + count], at + count
    return out


def make_judge(con, options: SortEvalOptions, runs: list[LayerRun]) -> Judge:
    from clipscope_explorer.precompute.evaluate.sample_images import SampleImages

    if options.judge == "embedding" and options.judge_model is None:
        from clipscope_explorer.precompute.evaluate.embedding_judge import EmbeddingJudge, stored_embeddings

        return EmbeddingJudge(stored_embeddings(con), model=_index_model(con))
    if options.judge == "embedding":  # another open_clip model embeds the images the trials show
        from clipscope_explorer.precompute.evaluate.embedding_judge import RemappedJudge, model_embeddings
        from clipscope_explorer.precompute.model.vision import ModelLoadError, ModelSpec

        shown = {
            i
            for run in runs
            for kind in ("pairs", "null", "feature")
            for t in getattr(run, _field(kind))
            for i in (*t.trial_images.grid1, *t.trial_images.grid2, t.trial_images.query)
        }
        ids = sorted(shown)
        spec = ModelSpec(options.judge_model, options.judge_pretrained)
        images = SampleImages(options.index, options.images_root)
        try:
            vectors = model_embeddings(spec, images, ids, options.device, progress=options.progress)
        except ModelLoadError as error:
            raise EvaluateError(str(error)) from error
        return RemappedJudge(np.array(ids), vectors, spec.describe())
    from clipscope_explorer.precompute.evaluate.openai_judge import OpenAIJudge

    cache = options.judge_cache or options.index.with_name(options.index.name + ".judge-cache")
    return OpenAIJudge(
        options.judge_url,
        options.judge_model,
        SampleImages(options.index, options.images_root),
        key_env=options.judge_key_env,
        cache_dir=cache,
        concurrency=options.judge_concurrency,
        timeout_s=options.judge_timeout,
        retries=options.judge_retries,
        progress=options.progress,
    )


def _index_model(con) -> str | None:
    rows = con.execute("SELECT value FROM meta WHERE key = 'model'").fetchall()
    return json.loads(rows[0][0]).get("name") if rows else None


def evaluate(options: SortEvalOptions) -> Path:
    """Run the sort evaluation and write it into the index (or `options.out`); the file written."""
    from clipscope_explorer.precompute.index.store import IndexUpdater

    index = Path(options.index)
    if options.token not in TOKENS:
        raise EvaluateError(f"--token {options.token}: 'cls' or 'image'")
    con = open_index(index)
    try:
        meta, layers = check_index_file(con, str(index))
        chosen = chosen_layers(index, options.layers, layers)
        if not _has_codes(con):
            raise EvaluateError(
                f"{index} holds no per-image CLS codes (schema 1.{meta.get('schema_minor', 0)}): rebuild it with "
                "clipscope-explorer precompute (this version writes them) to evaluate it"
            )
        n_samples = con.execute("SELECT count(*) FROM samples").fetchall()[0][0]
        encoder = image_encoder(index, meta, layers, chosen, options) if options.token == "image" else None
        runs = [plan_layer(con, layer, layers[layer]["n_features"], n_samples, options, encoder) for layer in chosen]
        start = time.perf_counter()
        judge = make_judge(con, options, runs)
        log.info("judge ready (%s) in %.1f s", options.judge, time.perf_counter() - start)
        results = []
        for run in runs:
            answers = answer_layer(run, judge)
            results.append((run, answers, summary(run, answers, options, judge)))
    except IndexCheckError as error:
        raise EvaluateError(str(error)) from error
    finally:
        con.close()
    start = time.perf_counter()
    written = write_results(index, options.out or index, results, options.token, judge.name, IndexUpdater)
    log.info("results written into %s in %.1f s", written, time.perf_counter() - start)
    return written


def image_encoder(index: Path, meta: dict, layer_rows: dict, layers: list[int], options: SortEvalOptions):
    """`image` mode: (image_id, layer) -> the layer's features firing on some token of the image, by encoding
    the original image again with the index's model and SAEs."""
    from clipscope_explorer.precompute.evaluate.index_model import IndexModel
    from clipscope_explorer.precompute.evaluate.sample_images import SampleImages
    from clipscope_explorer.precompute.model.sae import SAELoadError
    from clipscope_explorer.precompute.model.vision import ModelLoadError

    try:
        model = IndexModel.load(meta, layer_rows, layers, options.device, options.sae)
    except (ModelLoadError, SAELoadError) as error:
        raise EvaluateError(f"{index}: the image token mode encodes queries again: {error}") from error
    images = SampleImages(index, options.images_root, originals=True)

    def encode(image_id: int, layer: int) -> np.ndarray:
        return model.firing(model.tower.preprocess(images.image(image_id)).unsqueeze(0), layer)[0]

    return encode


def chosen_layers(index: Path, asked: list[int] | None, layers: dict, error=None) -> list[int]:
    """The layers asked for (default: all of the index's), each one the index holds; else `error` (an
    EvaluateError by default) naming the first it lacks."""
    chosen = asked or sorted(layers)
    unknown = [layer for layer in chosen if layer not in layers]
    if unknown:
        have = ", ".join(map(str, sorted(layers)))
        raise (error or EvaluateError)(f"{index}: no layer {unknown[0]} (the index has {have})")
    return chosen


def open_index(index: Path):
    """A read-only view of the index: attached to a connection of its own, so that it opens beside any other
    connection this process holds to the same file (a server's, a notebook's `open_index`), whatever their
    settings (DuckDB refuses a second direct connection with other settings)."""
    if not index.is_file():
        raise EvaluateError(f"index not found: {index}")
    con = duckdb.connect(config={"threads": 2})
    try:
        quoted = str(index).replace("'", "''")
        con.execute(f"ATTACH '{quoted}' AS evaluated (READ_ONLY)")
        con.execute("USE evaluated")
    except duckdb.Error as error:
        con.close()
        raise EvaluateError(f"cannot open {index} as a DuckDB index: {first_line(error)}") from error
    return con


def _has_codes(con) -> bool:
    tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    return {"samples", "sample_codes"} <= tables and con.execute("SELECT count(*) FROM sample_codes").fetchall()[0][
        0
    ] > 0


def write_results(index: Path, out: Path, results: list, token: str, judge: str, updater) -> Path:
    with updater(index, out, TABLES) as writer:
        for run, answers, row in results:
            for table in TABLES:
                writer.delete_rows(table, "layer = ? AND token = ? AND judge = ?", [run.layer, token, judge])
            writer.add_rows("sort_eval", {name: [value] for name, value in row.items()})
            writer.add_rows("sort_eval_features", feature_columns(run, answers, token, judge))
            writer.add_rows("sort_eval_trials", trial_columns(run, answers, token, judge))
        return writer.finish()
