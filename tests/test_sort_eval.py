"""The sort evaluation (precompute/evaluate/) against independent expectations: brute-force firing sets and
eligibility, the Wilson formula, a judge computed per trial in float64, planted features a judge must sort
and random ones it cannot, and `evaluate` end to end on an index built by the real precompute job."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest

from clipscope_explorer.cli import main
from clipscope_explorer.precompute.evaluate import sort_eval
from clipscope_explorer.precompute.evaluate.embedding_judge import EmbeddingJudge
from clipscope_explorer.precompute.evaluate.judging import Trial
from clipscope_explorer.precompute.evaluate.run import EvaluateError, SortEvalOptions, evaluate
from clipscope_explorer.precompute.index.check import check_index_file


def random_codes(seed=0, n_images=300, n_features=40, k=4):
    """Per image k distinct features with values, some of them <= 0 (kept but not firing)."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(n_features, 0.3))
    indices = np.stack([rng.choice(n_features, k, replace=False, p=popularity) for _ in range(n_images)])
    values = rng.normal(1.0, 1.0, (n_images, k)).astype(np.float32)
    return indices, values


def firing_of(indices, values, n_features):
    images = np.repeat(np.arange(len(indices)), indices.shape[1])
    return sort_eval.firing_from_codes(images, indices.ravel(), values.ravel(), n_features)


def brute_force_firing(indices, values, n_features):
    """feature -> [(image, value)] strongest first, ties by image."""
    fires = {f: [] for f in range(n_features)}
    for image, (row, vals) in enumerate(zip(indices, values)):
        for feature, value in zip(row, vals):
            if value > 0:
                fires[int(feature)].append((image, float(value)))
    return {f: [i for i, _ in sorted(pairs, key=lambda p: (-p[1], p[0]))] for f, pairs in fires.items()}


def test_firing_is_each_features_images_strongest_first():
    indices, values = random_codes()
    values[0, 0] = values[1, 0] = 5.0  # a tie, broken by image id
    firing = firing_of(indices, values, 40)
    expected = brute_force_firing(indices, values, 40)
    for feature in range(40):
        assert firing.images_of(feature).tolist() == expected[feature]
        assert firing.top(feature) == tuple(expected[feature][:9])
        for image in range(0, 300, 7):
            assert firing.fires(feature, image) == (image in expected[feature])
    assert firing.live().tolist() == [f for f in range(40) if expected[f]]


def test_queries_are_eligible_and_uniform_over_the_eligible():
    indices, values = random_codes(seed=1)
    firing = firing_of(indices, values, 40)
    expected = brute_force_firing(indices, values, 40)
    rng = np.random.default_rng(0)
    checked = 0
    for owner in range(40):
        for other in range(40):
            if owner == other:
                continue
            eligible = set(expected[owner][9:]) - set(expected[other])
            query = sort_eval.draw_query(firing, owner, other, rng)
            if not eligible:
                assert query is None
                continue
            assert query in eligible
            checked += 1
    assert checked > 200
    # uniform: one pair drawn many times, each eligible image about equally often
    owner, other = max(
        ((o, t) for o in range(40) for t in range(40) if o != t),
        key=lambda p: len(set(expected[p[0]][9:]) - set(expected[p[1]])),
    )
    eligible = set(expected[owner][9:]) - set(expected[other])
    counts = Counter(sort_eval.draw_query(firing, owner, other, rng) for _ in range(200 * len(eligible)))
    assert set(counts) == eligible
    assert max(counts.values()) / min(counts.values()) < 1.6


def test_the_exact_list_is_used_when_random_draws_keep_missing():
    """Owner fires on 9 + 40 images; the other fires on all but one of the 40: only that one is eligible."""
    images = list(range(49)) + list(range(9, 48))
    features = [0] * 49 + [1] * 39
    values = [float(100 - i) for i in range(49)] + [1.0] * 39
    firing = sort_eval.firing_from_codes(np.array(images), np.array(features), np.array(values), 2)
    rng = np.random.default_rng(0)
    assert {sort_eval.draw_query(firing, 0, 1, rng) for _ in range(20)} == {48}


def test_pairs_without_a_query_are_replaced_and_counted():
    """Features 0 and 1 fire on the same images (no query between them); feature 2 on others."""
    images = list(range(30)) * 2 + list(range(30, 60))
    features = [0] * 30 + [1] * 30 + [2] * 30
    values = np.random.default_rng(0).uniform(0.1, 1, 90)
    firing = sort_eval.firing_from_codes(np.array(images), np.array(features), values, 3)
    trials, replaced = sort_eval.plan_pairs(firing, np.array([0, 1, 2]), 60, seed=0, run_seed=0)
    assert len(trials) == 60 and replaced > 0
    assert all({t.grid1_feature, t.grid2_feature} != {0, 1} for t in trials)
    for t in trials:
        owner_top = firing.top(t.query_feature)
        assert t.trial_images.grid1 == firing.top(t.grid1_feature) and t.trial_images.grid2 == firing.top(
            t.grid2_feature
        )
        assert t.trial_images.query not in owner_top and firing.fires(t.query_feature, t.trial_images.query)
    # the order of the grids is random: the right answer is 1 about half the time
    assert 0.3 < np.mean([t.right_answer == 1 for t in trials]) < 0.7
    none, replaced = sort_eval.plan_pairs(firing, np.array([0, 1]), 5, seed=0, run_seed=0)
    assert none == [] and replaced == 250  # gives up after 50 x pairs


def test_plans_are_reproducible_from_their_seeds():
    indices, values = random_codes(seed=2)
    firing = firing_of(indices, values, 40)
    live = firing.live()
    first = sort_eval.plan_pairs(firing, live, 50, seed=3, run_seed=7)
    assert first == sort_eval.plan_pairs(firing, live, 50, seed=3, run_seed=7)
    assert first != sort_eval.plan_pairs(firing, live, 50, seed=4, run_seed=7)


def test_null_trials_keep_the_query_and_draw_random_grids():
    indices, values = random_codes(seed=3)
    firing = firing_of(indices, values, 40)
    trials, _ = sort_eval.plan_pairs(firing, firing.live(), 40, seed=0, run_seed=0)
    null = sort_eval.null_trials(trials, 300, run_seed=0)
    for planned, control in zip(trials, null):
        assert control.kind == "null" and control.trial_images.query == planned.trial_images.query
        grids = control.trial_images.grid1 + control.trial_images.grid2
        assert len(set(control.trial_images.grid1)) == 9 and planned.trial_images.query not in grids
        assert all(0 <= image < 300 for image in grids)


@pytest.mark.parametrize("correct, trials", [(0, 10), (5, 10), (10, 10), (733, 1000), (1, 1)])
def test_wilson_interval_is_the_formula(correct, trials):
    p, z = correct / trials, 1.959963984540054
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    assert sort_eval.wilson(correct, trials) == pytest.approx((max(0, centre - half), min(1, centre + half)))
    assert sort_eval.wilson(0, 0) == (0.0, 1.0)


def test_embedding_judge_is_the_cosine_with_each_grids_mean():
    rng = np.random.default_rng(4)
    embeddings = rng.standard_normal((200, 16)).astype(np.float16)
    trials = [
        Trial(
            tuple(rng.choice(200, 9, replace=False)), tuple(rng.choice(200, 9, replace=False)), int(rng.integers(200))
        )
        for _ in range(300)
    ] + [Trial((1, 2, 3), (4,), 5)]  # a short grid
    answers = EmbeddingJudge(embeddings).answer(trials)
    vectors = embeddings.astype(np.float64)
    for trial, answer in zip(trials, answers):
        means = [vectors[list(grid)].mean(axis=0) for grid in (trial.grid1, trial.grid2)]
        cosines = [vectors[trial.query] @ m / np.linalg.norm(m) for m in means]
        assert answer == (1 if cosines[0] >= cosines[1] else 2)
    assert set(answers) == {1, 2}


def planted_world(n_features=30, per_feature=40, dim=32, spread=0.3, seed=5):
    """Each image shows one feature's concept: its embedding is that feature's direction plus noise, and its
    CLS code holds that feature (and one random other, kept by the top-k with a negative value: not firing)."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_features, dim))
    owners = np.repeat(np.arange(n_features), per_feature)
    embeddings = directions[owners] + spread * np.linalg.norm(directions, axis=1).mean() * rng.standard_normal(
        (len(owners), dim)
    ) / np.sqrt(dim)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    noise = rng.integers(n_features, size=len(owners))
    indices = np.stack([owners, noise], axis=1)
    values = np.stack([rng.uniform(1, 2, len(owners)), rng.uniform(-0.1, 0.0, len(owners))], axis=1)
    return firing_of(indices, values, n_features), embeddings.astype(np.float16)


def test_planted_features_are_sorted_and_random_grids_are_not():
    firing, embeddings = planted_world()
    judge = EmbeddingJudge(embeddings)
    trials, _ = sort_eval.plan_pairs(firing, firing.live(), 400, seed=0, run_seed=0)
    main_score = sort_eval.score(trials, judge.answer([t.trial_images for t in trials]))
    null = sort_eval.null_trials(trials, len(embeddings), run_seed=0)
    null_score = sort_eval.score(null, judge.answer([t.trial_images for t in null]))
    assert main_score.accuracy > 0.95 and main_score.trials == 400
    assert abs(null_score.accuracy - 0.5) < 0.1
    assert abs(main_score.answer_1_rate - 0.5) < 0.1
    # shuffled embeddings: the grids say nothing about the query
    shuffled = EmbeddingJudge(embeddings[np.random.default_rng(0).permutation(len(embeddings))])
    assert abs(sort_eval.score(trials, shuffled.answer([t.trial_images for t in trials])).accuracy - 0.5) < 0.1


def test_score_counts_unanswered_apart():
    trials, _ = sort_eval.plan_pairs(planted_world()[0], np.arange(30), 10, seed=0, run_seed=0)
    answers = [t.right_answer for t in trials[:6]] + [3 - trials[6].right_answer, None, None, 1]
    got = sort_eval.score(trials, answers)
    assert (got.trials, got.unanswered) == (8, 2)
    assert got.correct == 6 + (trials[9].right_answer == 1)


# ---- evaluate, end to end on an index built by the real job ----


@pytest.fixture(scope="module")
def evaluated(tiny_index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluated") / "tiny.duckdb"
    return evaluate(SortEvalOptions(index=tiny_index, out=out, pairs=40, seeds=2, features=0, per_feature=3))


def test_evaluate_writes_a_checked_index_and_leaves_the_source(evaluated, tiny_index):
    with duckdb.connect(str(tiny_index), read_only=True) as con:
        assert "sort_eval" not in {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()} or (
            con.execute("SELECT count(*) FROM sort_eval").fetchall()[0][0] == 0
        )
    with duckdb.connect(str(evaluated), read_only=True) as con:
        meta, layers = check_index_file(con, str(evaluated), thorough=True)
        assert meta["schema_minor"] >= 3
        rows = con.execute("SELECT * FROM sort_eval ORDER BY layer").fetchall()
        columns = [d[0] for d in con.description]
        runs = [dict(zip(columns, row)) for row in rows]
        assert [r["layer"] for r in runs] == sorted(layers)
        for run in runs:
            kinds = dict(
                con.execute(
                    "SELECT kind, count(*) FROM sort_eval_trials WHERE layer = ? GROUP BY kind", [run["layer"]]
                ).fetchall()
            )
            assert kinds["pairs"] == kinds["null"] == run["trials"] + run["unanswered"] == 80
            right = con.execute(
                "SELECT count(*) FILTER (answer = CASE WHEN query_feature = grid1_feature THEN 1 ELSE 2 END) "
                "FROM sort_eval_trials WHERE layer = ? AND kind = 'pairs'",
                [run["layer"]],
            ).fetchall()[0][0]
            assert run["correct"] == right and run["accuracy"] == pytest.approx(right / run["trials"])
            assert run["ci_low"] <= run["accuracy"] <= run["ci_high"]
            assert (run["token"], run["judge"], run["seeds"], run["pairs"]) == ("cls", "embedding", 2, 40)
            assert json.loads(run["usage"])["trials"] > 0
            per_feature = con.execute(
                "SELECT sum(trials), sum(correct) FROM sort_eval_features WHERE layer = ?", [run["layer"]]
            ).fetchall()[0]
            counted = con.execute(
                "SELECT count(*), count(*) FILTER (answer = CASE WHEN query_feature = grid1_feature THEN 1 ELSE 2 END)"
                " FROM sort_eval_trials WHERE layer = ? AND kind = 'feature'",
                [run["layer"]],
            ).fetchall()[0]
            assert per_feature == counted and counted[0] > 0


def test_trials_follow_the_protocol_on_the_real_codes(evaluated):
    with duckdb.connect(str(evaluated), read_only=True) as con:
        layer = con.execute("SELECT min(layer) FROM sort_eval").fetchall()[0][0]
        codes = con.execute(
            "SELECT image_id, indices, activations FROM sample_codes WHERE layer = ?", [layer]
        ).fetchall()
        trials = con.execute(
            "SELECT grid1_feature, grid2_feature, query_feature, query_image FROM sort_eval_trials "
            "WHERE layer = ? AND kind <> 'null'",
            [layer],
        ).fetchall()
    fires: dict[int, dict[int, float]] = {}
    for image, indices, values in codes:
        for feature, value in zip(indices, values):
            if value > 0:
                fires.setdefault(feature, {})[image] = value
    top = {f: sorted(images, key=lambda i: (-images[i], i))[:9] for f, images in fires.items()}
    for first, second, owner, query in trials:
        other = second if owner == first else first
        assert owner in (first, second) and first != second
        assert query in fires[owner] and query not in fires.get(other, {})
        assert query not in top[owner] and query not in top[other]


def test_a_rerun_replaces_its_own_results_in_place(evaluated, tmp_path):
    index = Path(shutil.copy(evaluated, tmp_path / "again.duckdb"))
    assert main(["evaluate", str(index), "--pairs", "10", "--seeds", "1", "--layers", "1", "--no-progress"]) == 0
    with duckdb.connect(str(index), read_only=True) as con:
        runs = dict(con.execute("SELECT layer, pairs FROM sort_eval").fetchall())
        assert runs[1] == 10 and any(pairs == 40 for layer, pairs in runs.items() if layer != 1)
        assert con.execute("SELECT count(*) FROM sort_eval_trials WHERE layer = 1 AND kind = 'null'").fetchall() == [
            (10,)
        ]
        # without --per-feature, a feature's own score comes from the pairs' trials whose query it owns
        assert con.execute("SELECT sum(trials) FROM sort_eval_features WHERE layer = 1").fetchall() == [(10,)]


def test_bad_input_is_one_clear_line(tiny_index, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.duckdb")]) == 2
    assert "index not found" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_index), "--layers", "99", "--out", str(tmp_path / "x.duckdb")]) == 2
    assert "no layer 99" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(tiny_index), "--judge", "openai"])
    assert "--judge-url" in capsys.readouterr().err
    not_index = tmp_path / "plain.duckdb"
    duckdb.connect(str(not_index)).close()
    assert main(["evaluate", str(not_index)]) == 2
    assert str(not_index) in capsys.readouterr().err
    assert not (tmp_path / "x.duckdb").exists()


def test_an_index_without_codes_names_the_rebuild(tiny_index, tmp_path):
    index = Path(shutil.copy(tiny_index, tmp_path / "old.duckdb"))
    with duckdb.connect(str(index)) as con:
        con.execute("DELETE FROM sample_codes")
    with pytest.raises(EvaluateError, match="rebuild it with clipscope-explorer precompute"):
        evaluate(SortEvalOptions(index=index))


def test_evaluate_with_an_openai_compatible_judge_and_resume(tiny_index, tmp_path, capsys):
    """The CLI against a local fake endpoint: every trial asked once; its answers, the controls and the usage
    land in the index; a rerun answers from the disk cache (no request); a dead endpoint is counted, not fatal."""
    from tests.fake_openai import FakeOpenAI

    out, cache = tmp_path / "judged.duckdb", tmp_path / "answers"
    flags = ["--layers", "1", "--pairs", "6", "--seeds", "1", "--judge", "openai", "--judge-model", "fake-vlm"]
    flags += ["--judge-cache", str(cache), "--no-progress", "--out", str(out)]
    with FakeOpenAI(default="one") as server:
        assert main(["evaluate", str(tiny_index), "--judge-url", server.url, *flags]) == 0
        asked = len(server.requests)
        assert main(["evaluate", str(tiny_index), "--judge-url", server.url, *flags]) == 0
        assert len(server.requests) == asked == 12  # 6 trials and 6 null trials, then nothing more
    with duckdb.connect(str(out), read_only=True) as con:
        run = con.execute(
            "SELECT judge, judge_model, trials, unanswered, answer_1_rate, usage FROM sort_eval"
        ).fetchall()[0]
        answers = {a for (a,) in con.execute("SELECT answer FROM sort_eval_trials").fetchall()}
    assert run[:5] == ("openai", "fake-vlm", 6, 0, 1.0) and answers == {1}
    assert json.loads(run[5])["cached"] == 12
    capsys.readouterr()
    with FakeOpenAI(default="500") as dead:
        code = main(
            [
                "evaluate",
                str(tiny_index),
                "--judge-url",
                dead.url,
                *flags[:-2],
                "--out",
                str(tmp_path / "d.duckdb"),
                "--judge-retries",
                "1",
            ]
        )
    with duckdb.connect(str(tmp_path / "d.duckdb"), read_only=True) as con:
        trials, unanswered, usage = con.execute("SELECT trials, unanswered, usage FROM sort_eval").fetchall()[0]
    assert code == 0 and trials == 0 and unanswered == 6 and json.loads(usage)["failed"] == 12


def test_the_embedding_judge_with_another_open_clip_model(tiny_index, tiny_model_spec, tmp_path):
    """`--judge-model` for the embedding judge: the images the trials show, embedded by that model from their
    pixels, decide every answer (recomputed here with open_clip itself)."""
    import open_clip
    import torch

    from clipscope_explorer.precompute.evaluate.sample_images import SampleImages

    out = tmp_path / "model-judged.duckdb"
    code = main(
        ["evaluate", str(tiny_index), "--out", str(out), "--layers", "1", "--pairs", "15", "--seeds", "1"]
        + ["--judge-model", tiny_model_spec, "--device", "cpu", "--no-progress"]
    )
    assert code == 0
    with duckdb.connect(str(out), read_only=True) as con:
        judge_model, usage = con.execute("SELECT judge_model, usage FROM sort_eval").fetchall()[0]
        codes = con.execute("SELECT image_id, indices, activations FROM sample_codes WHERE layer = 1").fetchall()
        trials = con.execute(
            "SELECT grid1_feature, grid2_feature, query_image, answer FROM sort_eval_trials WHERE kind = 'pairs'"
        ).fetchall()
    assert judge_model == tiny_model_spec and json.loads(usage)["images_embedded"] > 0
    fires: dict[int, dict[int, float]] = {}
    for image, indices, values in codes:
        for feature, value in zip(indices, values):
            if value > 0:
                fires.setdefault(feature, {})[image] = value
    top = {f: sorted(images, key=lambda i: (-images[i], i))[:9] for f, images in fires.items()}
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model_spec)
    images = SampleImages(tiny_index)

    def embed(ids):
        with torch.inference_mode():
            pixels = torch.stack([preprocess(image) for image in images.images(ids)])
            return model.eval().encode_image(pixels, normalize=True).double().numpy().astype(np.float16).astype(float)

    for first, second, query, answer in trials:
        means = [embed(top[f]).mean(axis=0) for f in (first, second)]
        cosines = [embed([query])[0] @ (m / np.linalg.norm(m)) for m in means]
        assert answer == (1 if cosines[0] >= cosines[1] else 2)


def test_the_image_token_mode_re_encodes_the_queries(tiny_index, tiny_model_spec, tiny_sae_repo, tmp_path):
    """`--token image`: grids are the top lists, queries the owner's other examples, and the other feature
    does not fire on any token of the query (checked by encoding each query again through the job's own
    loaders, independently of the evaluation's encoder)."""
    from clipscope_explorer.precompute.evaluate.sample_images import SampleImages
    from clipscope_explorer.precompute.model.checkpoints import load_sae
    from clipscope_explorer.precompute.model.encode import encode_pixels
    from clipscope_explorer.precompute.model.vision import load_tower

    out = tmp_path / "image-mode.duckdb"
    code = main(
        ["evaluate", str(tiny_index), "--out", str(out), "--token", "image", "--layers", "1", "--pairs", "12"]
        + ["--seeds", "1", "--device", "cpu", "--no-progress"]
    )
    assert code == 0
    with duckdb.connect(str(out), read_only=True) as con:
        run = con.execute("SELECT token, trials, null_trials FROM sort_eval WHERE token = 'image'").fetchall()[0]
        trials = con.execute(
            "SELECT grid1_feature, grid2_feature, query_feature, query_image FROM sort_eval_trials "
            "WHERE token = 'image' AND kind = 'pairs'"
        ).fetchall()
        examples = con.execute(
            "SELECT feature, kind, rank, band, image_id FROM examples WHERE layer = 1 "
            "ORDER BY feature, kind = 'band', band, rank"
        ).fetchall()
    assert run == ("image", 12, 12) and len(trials) == 12
    shown: dict[int, list[int]] = {}
    for feature, _, _, _, image in examples:
        shown.setdefault(feature, []).append(image)
    tower = load_tower(tiny_model_spec, device="cpu")
    sae = load_sae(str(tiny_sae_repo), 1)
    images = SampleImages(tiny_index, originals=True)
    for first, second, owner, query in trials:
        other = second if owner == first else first
        assert query in shown[owner][9:] and query not in shown[other]
        code = encode_pixels(tower, {1: sae}, tower.preprocess(images.image(query)).unsqueeze(0))[1].code
        on_other = code.values[0][code.indices[0] == other]
        assert on_other.numel() == 0 or float(on_other.max()) <= 0
