"""`clipscope-explorer lineage`: each feature's best related features at every other layer of an index
(`lineage.py` says how they are scored), written into the index's `lineage` table.

Reads every chosen layer's CLS codes (`sample_codes`) and top images (`examples`) once, then relates each
pair of layers both ways. The rows of the chosen layers' pairs replace the earlier ones; the file is
rewritten atomically (IndexUpdater), in place or into `out`.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from clipscope_explorer.precompute.evaluate.lineage import (
    Links,
    Occurrences,
    occurrences_from_codes,
    occurrences_from_rows,
    pair_links,
)
from clipscope_explorer.precompute.evaluate.run import EvaluateError, chosen_layers, open_index
from clipscope_explorer.precompute.index.check import IndexCheckError, check_index_file

log = logging.getLogger(__name__)

TABLES = ("lineage",)
SOURCES = ("cls", "top_images")


class LineageError(EvaluateError):
    """Lineage cannot be computed on this index as asked (one line naming the index and what to do)."""


@dataclass(frozen=True)
class LineageOptions:
    index: Path
    out: Path | None = None
    layers: list[int] | None = None  # default: every layer of the index
    links: int = 5  # per feature, other layer and source
    min_support: int = 3  # `cls`: images on which both fire
    min_shared: int = 2  # `top_images`: top images both have
    processes: int = 2  # layer pairs computed at once
    progress: bool = True


def sample_ids(con) -> np.ndarray:
    """The sample's image ids, ascending: the rows of every occurrence matrix."""
    return con.execute("SELECT image_id FROM samples ORDER BY image_id").fetchnumpy()["image_id"].astype(np.int64)


def _rows(ids: np.ndarray, image_ids: np.ndarray, what: str) -> np.ndarray:
    rows = np.searchsorted(ids, image_ids)
    if len(rows) and (rows.max() >= len(ids) or np.any(ids[rows] != image_ids)):
        raise LineageError(f"{what} names an image that `samples` does not hold: the index is inconsistent")
    return rows


def cls_occurrences(con, layer: int, ids: np.ndarray, n_features: int) -> Occurrences:
    """Which features fire on each sample image's CLS token at `layer` (a kept value > 0)."""
    relation = con.sql(
        "SELECT image_id, indices, activations FROM sample_codes WHERE layer = $layer ORDER BY image_id",
        params={"layer": layer},
    )
    table = (getattr(relation, "to_arrow_table", None) or relation.arrow)()  # DuckDB 2 / 1
    indices, values = (
        pa.concat_arrays(table[name].chunks) if table.num_rows else None for name in ("indices", "activations")
    )
    if indices is None:
        return occurrences_from_rows(np.zeros(0), np.zeros(0), len(ids), n_features)
    offsets = indices.offsets.to_numpy()
    rows = _rows(ids, table["image_id"].to_numpy().astype(np.int64), f"sample_codes of layer {layer}")
    return occurrences_from_codes(
        rows, offsets - offsets[0], indices.flatten().to_numpy(), values.flatten().to_numpy(), len(ids), n_features
    )


def top_occurrences(con, layer: int, ids: np.ndarray, n_features: int) -> Occurrences:
    """Which features have each sample image among their top images at `layer`."""
    flat = con.execute("SELECT feature, image_id FROM examples WHERE layer = ? AND kind = 'top'", [layer]).fetchnumpy()
    rows = _rows(ids, flat["image_id"].astype(np.int64), f"the top images of layer {layer}")
    return occurrences_from_rows(rows, flat["feature"], len(ids), n_features)


def link_columns(layer: int, other_layer: int, source: str, links: Links) -> dict:
    """`lineage` rows of one direction, as the writer takes them."""
    n = len(links)
    return {
        "layer": np.full(n, layer, np.int32),
        "feature": links.feature.astype(np.int32),
        "other_layer": np.full(n, other_layer, np.int32),
        "other_feature": links.other.astype(np.int32),
        "source": pa.repeat(source, n),
        "score": links.score.astype(np.float64),
        "support": links.support.astype(np.int32),
    }


def _read(index: Path, options: LineageOptions) -> tuple[list[int], dict[str, dict[int, Occurrences]]]:
    con = open_index(index)
    try:
        meta, layers = check_index_file(con, str(index))
        chosen = sorted(set(chosen_layers(index, options.layers, layers, LineageError)))
        if len(chosen) < 2:
            named = "--layers names" if options.layers else "the index has"
            raise LineageError(f"{index}: lineage relates two layers or more, and {named} only layer {chosen[0]}")
        if not _has_codes(con):
            raise LineageError(
                f"{index} holds no per-image CLS codes (schema 1.{meta.get('schema_minor', 0)}): rebuild it with "
                "clipscope-explorer precompute (this version writes them) to compute its lineage"
            )
        ids = sample_ids(con)
        occurrences: dict[str, dict[int, Occurrences]] = {source: {} for source in SOURCES}
        for layer in chosen:
            start, n_features = time.perf_counter(), layers[layer]["n_features"]
            occurrences["cls"][layer] = cls_occurrences(con, layer, ids, n_features)
            occurrences["top_images"][layer] = top_occurrences(con, layer, ids, n_features)
            log.info("layer %d: occurrences read in %.1f s", layer, time.perf_counter() - start)
    except IndexCheckError as error:
        raise LineageError(str(error)) from error
    finally:
        con.close()
    return chosen, occurrences


def _has_codes(con) -> bool:
    tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    return {"samples", "sample_codes"} <= tables and bool(
        con.execute("SELECT count(*) FROM sample_codes").fetchall()[0][0]
    )


_OCCURRENCES: dict[str, dict[int, Occurrences]] = {}  # set before the workers fork, which inherit it


def _pair_job(job: tuple) -> tuple[tuple, Links, Links, float]:
    """One layer pair and source: (job, links of the first layer, links of the second, seconds)."""
    source, layer, other, n, min_support = job
    start = time.perf_counter()
    forward, backward = pair_links(_OCCURRENCES[source][layer], _OCCURRENCES[source][other], n, min_support)
    return job, forward, backward, time.perf_counter() - start


def _pair_results(jobs: list[tuple], processes: int) -> Iterator:
    """`_pair_job` of every job, in order: in `processes` forked workers (the products hold the GIL, so
    threads would not run them at once), or here."""
    if processes <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(_pair_job, jobs)
        return
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_pair_job, jobs)


def lineage(options: LineageOptions) -> Path:
    """Compute the lineage of the chosen layers and write it into the index (or `options.out`); the file written."""
    from clipscope_explorer.precompute.index.store import IndexUpdater

    index = Path(options.index)
    chosen, occurrences = _read(index, options)
    support = {"cls": options.min_support, "top_images": options.min_shared}
    jobs = [
        (source, layer, other, options.links, support[source])
        for layer, other in itertools.combinations(chosen, 2)
        for source in SOURCES
    ]
    _OCCURRENCES.clear()
    _OCCURRENCES.update(occurrences)
    try:
        results = _pair_results(jobs, options.processes)
        first = next(results)  # the workers fork before the writer opens its copy of the index
        with IndexUpdater(index, options.out or index, TABLES) as writer:
            writer.delete_rows("lineage", "list_contains(?, layer) AND list_contains(?, other_layer)", [chosen, chosen])
            bar = tqdm(total=len(jobs), desc="lineage", unit="pair", disable=not options.progress)
            for (source, layer, other, *_), forward, backward, seconds in itertools.chain([first], results):
                writer.add_rows("lineage", link_columns(layer, other, source, forward))
                writer.add_rows("lineage", link_columns(other, layer, source, backward))
                log.info(
                    "layers %d-%d %s: %d + %d links in %.1f s",
                    layer,
                    other,
                    source,
                    len(forward),
                    len(backward),
                    seconds,
                )
                bar.update()
            bar.close()
            return writer.finish()
    finally:
        results.close()
        _OCCURRENCES.clear()
