"""Every command's flags: a bad value is one line naming the flag and the value, exit 2, before any work;
good values parse to what they say; old flag names still work; shard patterns are capped."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from braceexpand import braceexpand

from clipscope_explorer import cli
from clipscope_explorer.cli import build_parser, main
from clipscope_explorer.precompute.shard_patterns import MAX_SHARDS, SourceError, expand_braces, expansion_bound

REPO = Path(__file__).resolve().parents[1]
SERVE = ["serve", "index.duckdb"]
PRECOMPUTE = ["precompute", "--images", "shards/{00000..00009}.tar", "--out", "{tmp}/out/index.duckdb"]
FIT = ["fit", "--images", "shards/{00000..00009}.tar", "--layers", "1", "--out", "{tmp}/sae"]
DEMO = ["demo", "--data", "{tmp}/demo"]

# (command line, the flag the message must name, the value it must quote)
BAD_FLAGS = [
    *[(SERVE + ["--port", value], "--port", value) for value in ("99999", "-1", "0", "８０", "80.0", "1_000", "")],
    *[
        (SERVE + ["--host", value], "--host", value)
        for value in ("256.1.1.1", "1.2.3", "exa mple.org", "a..b", "é.org")
    ],
    *[(SERVE + ["--workers", value], "--workers", value) for value in ("0", "65", "2.5")],
    *[
        (SERVE + ["--max-upload-mb", value], "--max-upload-mb", value)
        for value in ("nan", "inf", "-1", "0", "1001", "1e400", "0x10", "5MB")
    ],
    *[(SERVE + ["--live-layers", value], "--live-layers", value) for value in ("a,b", "20,20", ",", "-1", "99999")],
    *[(SERVE + ["--live-device", value], "--live-device", value) for value in ("gpu", "cuda:x", "CUDA", "cuda:1:2")],
    (SERVE + ["--live-precision", "fp16"], "--live-precision", "fp16"),
    (["serve", "~no-such-user/index.duckdb"], "index", "~no-such-user/index.duckdb"),
    (SERVE + ["--upload-store", "{file}"], "--upload-store", "{file}"),
    (SERVE + ["--upload-store", "{file}/uploads"], "--upload-store", "{file}/uploads"),
    (SERVE + ["--upload-store", "/proc/clipscope-uploads"], "--upload-store", "/proc/clipscope-uploads"),
    *[(PRECOMPUTE + ["--workers", value], "--workers", value) for value in ("-1", "257", "two")],
    *[
        (PRECOMPUTE + [flag, "0"], flag, "0")
        for flag in ("--batch-size", "--top-n", "--band-size", "--max-images", "--sae-checkpoint", "--save-state-every")
    ],
    (PRECOMPUTE + ["--top-n", "100000"], "--top-n", "100000"),
    (PRECOMPUTE + ["--max-images", "1e3"], "--max-images", "1e3"),
    (PRECOMPUTE + ["--sae-checkpoint", "final"], "--sae-checkpoint", "final"),
    (PRECOMPUTE + ["--checkpoint", "-5"], "--checkpoint", "-5"),
    (PRECOMPUTE + ["--layers", "a,b"], "--layers", "a,b"),
    (PRECOMPUTE + ["--layers", "2,5,2"], "--layers", "2,5,2"),
    *[(PRECOMPUTE + ["--device", value], "--device", value) for value in ("gpu", "cuda:", "mps")],
    (PRECOMPUTE + ["--normalise", "zscore"], "--normalise", "zscore"),
    (PRECOMPUTE + ["--precision", "fp16"], "--precision", "fp16"),
    (PRECOMPUTE[:3] + ["--out", "{tmp}"], "--out", "{tmp}"),
    (PRECOMPUTE[:3] + ["--out", "{file}/index.duckdb"], "--out", "{file}/index.duckdb"),
    (PRECOMPUTE[:3] + ["--out", "/proc/index.duckdb"], "--out", "/proc/index.duckdb"),
    (
        ["precompute", "--images", "x/{1..99999999999}.tar", "--out", "{tmp}/o.duckdb"],
        "--images",
        "x/{1..99999999999}.tar",
    ),
    (["precompute", "--images", "x/{1..3.tar", "--out", "{tmp}/o.duckdb"], "--images", "x/{1..3.tar"),
    (FIT[:5] + ["--out", "{file}"], "--out", "{file}"),
    (FIT + ["--k", "600"], "--k", "600"),
    *[(FIT + [flag, "0"], flag, "0") for flag in ("--features", "--k", "--steps", "--batch-tokens", "--max-images")],
    *[(FIT + ["--lr", value], "--lr", value) for value in ("nan", "0", "2", "-0.5", "1e")],
    (FIT + ["--device", "cuda:1:2"], "--device", "cuda:1:2"),
    (
        ["fit", "--images", "{0..999}/{0..9999}.tar", "--layers", "1", "--out", "{tmp}/sae"],
        "--images",
        "{0..999}/{0..9999}.tar",
    ),
    (DEMO + ["--port", "99999"], "--port", "99999"),
    (DEMO + ["--host", "256.1.1.1"], "--host", "256.1.1.1"),
    *[(DEMO + ["--images", value], "--images", value) for value in ("0", "100001", "many")],
    (["demo", "--data", "{file}"], "--data", "{file}"),
    (["demo", "--data", "/proc/clipscope-demo"], "--data", "/proc/clipscope-demo"),
    (["demo", "--data", "~no-such-user/demo"], "--data", "~no-such-user/demo"),
]


def fill(items: list[str], tmp: Path) -> list[str]:
    return [item.replace("{tmp}", str(tmp)).replace("{file}", str(tmp / "a-file")) for item in items]


@pytest.fixture
def places(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path


@pytest.fixture
def no_command_runs(monkeypatch):
    """Any command that starts despite a bad flag fails the test."""

    def refuse(args):
        pytest.fail(f"`{args.command}` ran despite a bad flag")

    monkeypatch.setattr(cli, "COMMANDS", {name: (*spec[:3], refuse) for name, spec in cli.COMMANDS.items()})


@pytest.mark.parametrize(
    "argv, flag, value", BAD_FLAGS, ids=[" ".join(case[0][:1] + case[0][-2:]) for case in BAD_FLAGS]
)
def test_a_bad_flag_is_one_line_naming_it(argv, flag, value, places, capsys, no_command_runs):
    with pytest.raises(SystemExit) as stop:
        main(fill(argv, places))
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    lines = [line for line in err.splitlines() if ": note: " not in line]  # a deprecated name adds its note
    assert len(lines) == 1 and lines[0].startswith(f"clipscope-explorer {argv[0]}: error: "), err
    assert flag in lines[0] and fill([value], places)[0] in lines[0], err


def test_flag_errors_load_nothing_heavy(places):
    """Run in a fresh interpreter: after every bad flag above, torch, open_clip, uvicorn, DuckDB and the
    app were never imported (so no model or index was loaded either), and each error was one line."""
    script = (
        "import contextlib, io, json, sys\n"
        "from clipscope_explorer.cli import main\n"
        "results = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stderr(err):\n"
        "            main(argv)\n"
        "        results.append(['returned', err.getvalue()])\n"
        "    except SystemExit as stop:\n"
        "        results.append([stop.code, err.getvalue()])\n"
        "heavy = sorted(m for m in sys.modules if m.startswith('clipscope_explorer.app')\n"
        "               or m.split('.')[0] in ('torch', 'open_clip', 'uvicorn', 'duckdb', 'fastapi'))\n"
        "print(json.dumps({'results': results, 'heavy': heavy}))\n"
    )
    argvs = [fill(argv, places) for argv, _, _ in BAD_FLAGS]
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argvs)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["heavy"] == []
    for argv, (code, err) in zip(argvs, report["results"]):
        assert code == 2 and "Traceback" not in err and len(err.splitlines()) in (1, 2), (argv, err)


@pytest.mark.parametrize(
    "command, flag, value",
    [
        (["-m", "clipscope_explorer.cli", "serve", "index.duckdb", "--port", "99999"], "--port", "99999"),
        (
            ["-m", "clipscope_explorer.precompute", "--images", "x/{1..99999999999}.tar", "--out", "o.duckdb"],
            "--images",
            "x/{1..99999999999}.tar",
        ),
    ],
)
def test_the_real_command_exits_2_without_a_traceback(command, flag, value, tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert flag in done.stderr and value in done.stderr
    assert time.monotonic() - started < 30  # no torch, no expansion of the range: seconds, not minutes


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_good_values_parse_to_what_they_say(tmp_path):
    store = tmp_path / "new" / "store"
    args = parse(
        "serve",
        "i.duckdb",
        "--host",
        "::1",
        "--port",
        "65535",
        "--workers",
        "64",
        "--max-upload-mb",
        "1e-3",
        "--live-layers",
        " 2, 5,8,",
        "--live-device",
        "cuda:0",
        "--upload-store",
        str(store),
    )
    assert (args.host, args.port, args.workers, args.max_upload_mb) == ("::1", 65535, 64, 0.001)
    assert (args.live_layers, args.live_device, args.upload_store) == ([2, 5, 8], "cuda:0", store)
    for host in ("localhost", "0.0.0.0", "example.org", "my-host.example.org.", "2001:db8::1"):
        assert parse("serve", "i.duckdb", "--host", host).host == host
    assert parse("serve", "i.duckdb", "--max-upload-mb", "1000").max_upload_mb == 1000.0
    assert not (tmp_path / "new").exists()  # checking a folder makes nothing
    args = parse(
        "precompute",
        "--images",
        "a/{0..9}.tar",
        "b",
        "--out",
        str(tmp_path / "x" / "y.duckdb"),
        "--workers",
        "0",
        "--device",
        "cuda:7",
        "--layers",
        "0,23",
        "--sae-checkpoint",
        "1200013184",
        "--top-n",
        "256",
        "--max-images",
        "0010",
        "--no-progress",
    )
    assert (args.workers, args.device, args.layers, args.checkpoint) == (0, "cuda:7", [0, 23], 1200013184)
    assert (args.top_n, args.max_images, args.progress, args.out) == (256, 10, False, tmp_path / "x" / "y.duckdb")
    args = parse("fit", "--images", "a", "--layers", "1", "--out", str(tmp_path), "--lr", ".5", "--k", "512")
    assert (args.lr, args.k, args.features, args.out) == (0.5, 512, 512, tmp_path)
    args = parse("demo", "--data", str(tmp_path), "--port", "1", "--images", "100000")
    assert (args.data, args.port, args.images) == (tmp_path, 1, 100_000)


def test_old_flag_names_still_work_with_a_note(tmp_path, capsys):
    args = parse(
        "precompute",
        "--images",
        "a",
        "--out",
        str(tmp_path / "o.duckdb"),
        "--checkpoint",
        "1000",
        "--checkpoint-every",
        "8",
    )
    assert (args.checkpoint, args.checkpoint_every) == (1000, 8)
    assert capsys.readouterr().err.splitlines() == [
        "clipscope-explorer precompute: note: --checkpoint is deprecated; use --sae-checkpoint",
        "clipscope-explorer precompute: note: --checkpoint-every is deprecated; use --save-state-every",
    ]
    args = parse("precompute", "--images", "a", "--out", str(tmp_path / "o.duckdb"))
    assert (args.checkpoint, args.checkpoint_every) == (None, 20_000) and capsys.readouterr().err == ""
    help_text = build_parser()._subparsers._group_actions[0].choices["precompute"].format_help()
    assert "--sae-checkpoint" in help_text and "--save-state-every" in help_text
    assert "--checkpoint " not in help_text and "--checkpoint-every" not in help_text


def test_every_flag_reaches_the_typed_options():
    """`serve` and `precompute` hand their flags to ServeOptions and PrecomputeConfig by name: none is dropped."""
    from clipscope_explorer.app.serving.server import ServeOptions
    from clipscope_explorer.precompute.job import PrecomputeConfig

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, options in (("serve", ServeOptions), ("precompute", PrecomputeConfig)):
        dests = {action.dest for action in commands[name]._actions} - {"help", "skip_existing"}
        assert dests <= {field.name for field in dataclasses.fields(options)}, name
    args = parse("-v", "serve", "i.duckdb", "--no-live", "--workers", "3")
    options = cli.options_from(ServeOptions, args)
    assert (options.verbose, options.live, options.workers, options.index) == (True, False, 3, Path("i.duckdb"))


PATTERNS = [
    "plain.tar",
    "s/{00008..00011}.tar",
    "{a,b}/{1..2}.tar",
    "{5..1}",
    "{1..10..3}",
    "{a..e..2}{,x}",
    "{07..10}",
    "x{a,b{1..3},c}y",
    "{1..3}{2..4}{3..5}",
    r"\{1..3\}",
    "{1..3",
    "{a}",
    "{,}",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_expansion_bound_against_the_expansion(pattern):
    """The bound is at least the real count, and exact unless a list holds further brace groups."""
    try:
        names = list(braceexpand(pattern))
    except ValueError:  # unbalanced: expand_braces names --images
        with pytest.raises(SourceError, match=r"--images .*unbalanced braces"):
            expand_braces(pattern)
        return
    assert expand_braces(pattern) == names
    nested = pattern == "x{a,b{1..3},c}y"
    assert expansion_bound(pattern) >= len(names) if nested else expansion_bound(pattern) == len(names)


def test_zero_padding_and_order_as_a_shell_gives_them():
    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


@pytest.mark.parametrize(
    "patterns",
    [
        ["x/{1..99999999999}.tar"],
        ["{1..1000}/{1..1001}.tar"],
        ["{" + "9" * 5000 + "..1}"],
        ["a/{1..600000}.tar", "b/{1..600000}.tar"],
    ],
)
def test_too_many_shards_are_refused_at_once(patterns):
    from clipscope_explorer.precompute.sources import resolve_sources

    started = time.monotonic()
    with pytest.raises(SourceError, match=f"--images.*more than {MAX_SHARDS:,} shards"):
        resolve_sources(patterns)
    assert time.monotonic() - started < 5


def test_the_cap_itself_is_allowed():
    names = expand_braces(f"a/{{1..{MAX_SHARDS}}}.tar")
    assert len(names) == MAX_SHARDS and names[-1] == f"a/{MAX_SHARDS}.tar"
