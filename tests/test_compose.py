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
    for folder in ("clipscope_explorer", "app", "precompute", "templates", "static"):
        assert f"COPY {folder} ./{folder}" in text
    assert "-e " not in text and "-c constraints.txt" in text  # a regular install, pinned as CI is
    assert 'ENTRYPOINT ["clipscope-explorer"]' in text
    cmd = text.split("CMD ", 1)[1].splitlines()[0]
    assert build_parser().parse_args(yaml.safe_load(cmd)).command == "demo"


def test_web_is_safe_to_publish_without_a_proxy(compose):
    """The web service publishes the server's port directly, so the server's own limits must hold: nothing in
    the service turns one off, and the open-file limit it sets leaves room for the connection cap."""
    from clipscope_explorer.app.serving.transport import FD_RESERVE
    from clipscope_explorer.app.settings import Settings

    web = compose["services"]["web"]
    assert web["ports"] == ["8000:8000"]
    environment = web.get("environment") or {}
    settings = Settings(
        index="/data/clipscope.duckdb",
        **{
            name.removeprefix("CLIPSCOPE_").lower(): value
            for name, value in environment.items()
            if name.startswith("CLIPSCOPE_")
        },
    )
    assert 0 < settings.read_timeout <= 30  # idle and slow-header connections are closed
    assert 1 <= settings.upload_slots_per_client < settings.live_queue_size  # one address never holds every slot
    assert settings.upload_min_rate >= 10_000  # a stalled upload frees its slot within minutes
    assert settings.read_timeout + settings.max_upload_bytes / settings.upload_min_rate <= 600
    nofile = web["ulimits"]["nofile"]
    assert settings.max_connections + FD_RESERVE <= nofile["soft"] <= nofile["hard"]
