"""`serve --workers N`: one listening socket per worker (app/serving/supervisor.py), checked on real processes.

- Connections opened in a burst and kept alive spread over the workers (uvicorn's shared socket put
  32 of 32 on one worker); which worker holds which connection is read from /proc.
- A worker killed with SIGKILL is replaced on its socket, and no request is refused meanwhile.
- A port already listened on (plainly, or by another SO_REUSEPORT group) is refused with one line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import REPO, run_server


def worker_pids(parent: int) -> list[int]:
    """The uvicorn workers among the server's children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def server_side_inodes(client_ports: set[int]) -> dict[str, int]:
    """Inode of the server's end of each TCP connection from one of `client_ports`, from /proc/net/tcp."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port in client_ports:
            found[fields[9]] = remote_port
    return found


def test_keep_alive_connections_spread_over_the_workers(e2e_index, tmp_path):
    processes: list = []
    server = run_server(
        e2e_index,
        "--workers",
        "2",
        "--no-live",
        "--upload-store",
        str(tmp_path / "up"),
        log_path=tmp_path / "serve.log",
        processes=processes,
    )
    base = next(server)
    port = int(base.rsplit(":", 1)[1])
    connections = []
    try:
        for _ in range(32):  # a burst, as a proxy's pool or a load test opens them
            connections.append(socket.create_connection(("127.0.0.1", port)))
        for sock in connections:
            sock.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in connections:
            assert sock.recv(12) == b"HTTP/1.1 200"  # every connection accepted and answered
        ends = server_side_inodes({sock.getsockname()[1] for sock in connections})
        held = {pid: len(socket_inodes(pid) & ends.keys()) for pid in worker_pids(processes[0].pid)}
        assert len(held) == 2 and sum(held.values()) == 32, held
        assert min(held.values()) >= 4, held  # kernel hashing: P(<= 3 of 32) < 1e-5 per worker
    finally:
        for sock in connections:
            sock.close()
        server.close()


def test_a_killed_worker_is_replaced_and_no_request_is_refused(e2e_index, tmp_path):
    processes: list = []
    log = tmp_path / "serve.log"
    server = run_server(
        e2e_index,
        "--workers",
        "2",
        "--no-live",
        "--upload-store",
        str(tmp_path / "up"),
        log_path=log,
        processes=processes,
    )
    base = next(server)
    try:
        before = worker_pids(processes[0].pid)
        os.kill(before[0], signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while time.monotonic() < deadline:  # requests while the slot is empty and its replacement starts
                statuses.append(client.get(base + "/api/layers/20/features/3").status_code)
                current = worker_pids(processes[0].pid)
                if len(current) == 2 and before[0] not in current:
                    break
            for _ in range(20):  # new connections hash to both sockets: the replaced slot answers too
                statuses.append(client.get(base + "/api/layers/20/features/3").status_code)
        after = worker_pids(processes[0].pid)
        assert len(after) == 2 and before[0] not in after and before[1] in after
        assert set(statuses) == {200}
        assert f"Worker [{before[0]}] died" in log.read_text()
    finally:
        server.close()


def test_a_port_in_use_is_refused_with_one_line(e2e_index):
    for reuse_port in (False, True):
        with socket.socket() as taken:
            if reuse_port:  # another server's SO_REUSEPORT group would otherwise share the port silently
                taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "clipscope_explorer.cli",
                    "serve",
                    str(e2e_index),
                    "--port",
                    str(port),
                    "--workers",
                    "2",
                    "--no-live",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"clipscope-explorer: error: cannot listen on 127.0.0.1:{port}: Address already in use"
        )


def test_workers_share_one_text_tower_process(tiny_index, tmp_path):
    """`serve` starts one text-tower process for all its workers; each worker searches by meaning through it,
    and the process goes with the server."""
    import shutil

    index = Path(shutil.copy(tiny_index, tmp_path / "tiny.duckdb"))
    processes: list = []
    environment = {**os.environ, "CLIPSCOPE_TEXT": "true"}
    server = run_server(index, "--workers", "2", "--no-live", processes=processes, env=environment)
    base = next(server)
    try:
        deadline = time.monotonic() + 60
        answers = []
        while len(answers) < 8:  # fresh connections: the kernel spreads them over both workers
            response = httpx.get(base + "/api/search/images", params={"q": "a red circle"}, timeout=10)
            if response.status_code == 503 and time.monotonic() < deadline:  # still loading
                time.sleep(0.2)
                continue
            assert response.status_code == 200, response.text
            answers.append([hit["image_id"] for hit in response.json()["images"]])
        assert answers[0] and all(answer == answers[0] for answer in answers)
        children = Path(f"/proc/{processes[0].pid}/task/{processes[0].pid}/children").read_text().split()
        spawned = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(spawned) == 3  # two workers and the one text tower
    finally:
        server.close()
    for pid in spawned:
        assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split(b") ")[1][:1]
