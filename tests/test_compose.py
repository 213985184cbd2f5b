"""No Docker engine runs here: the compose file and Dockerfile are checked by parsing them."""

from pathlib import Path

import pytest
import yaml

from clipscope_explorer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_volumes(compose):
    assert set(compose["services"]) == {"precompute", "web", "demo"}
    assert set(compose["volumes"]) == {"hf-cache", "data", "demo-data"}
    precompute, web, demo = (compose["services"][name] for name in ("precompute", "web", "demo"))
    assert "hf-cache:/cache" in precompute["volumes"] and "data:/data" in precompute["volumes"]
    assert "data:/data:ro" in web["volumes"], "the web service mounts the index read-only"
    assert demo["profiles"] == ["demo"] and "deploy" not in demo


def test_gpu_reservation_for_precompute_only(compose):
    devices = compose["services"]["precompute"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in compose["services"]["web"]


def test_web_waits_for_precompute_and_has_a_healthcheck(compose):
    web = compose["services"]["web"]
    assert web["depends_on"] == {"precompute": {"condition": "service_completed_successfully"}}
    assert "http://127.0.0.1:8000/api" in " ".join(web["healthcheck"]["test"])


@pytest.mark.parametrize("service", ["precompute", "web", "demo"])
def test_commands_exist_in_the_cli(compose, service):
    args = build_parser().parse_args(compose["services"][service]["command"])
    assert args.command == service if service != "web" else args.command == "serve"


def test_precompute_does_nothing_when_the_index_exists(compose, tmp_path, capsys):
    from clipscope_explorer.cli import main

    command = list(compose["services"]["precompute"]["command"])
    out = tmp_path / "existing.duckdb"
    out.write_bytes(b"an index")
    command[command.index("--out") + 1] = str(out)
    assert "--skip-existing" in command
    assert main(command) == 0
    assert "nothing to do" in capsys.readouterr().out and out.read_bytes() == b"an index"


def test_dockerfile_installs_the_project_and_uses_the_cli():
    text = (ROOT / "Dockerfile").read_text()
    for folder in ("app", "precompute", "templates", "static"):
        assert f"COPY {folder} ./{folder}" in text
    assert 'ENTRYPOINT ["clipscope-explorer"]' in text
    cmd = text.split("CMD ", 1)[1].splitlines()[0]
    assert build_parser().parse_args(yaml.safe_load(cmd)).command == "demo"
