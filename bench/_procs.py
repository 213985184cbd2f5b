"""Process trees from /proc (Linux): a server's processes, their summed RSS and CPU time, the machine's
busy time. Shared by the bench scripts that run a real server."""

from __future__ import annotations

import os
from collections import defaultdict

TICK = os.sysconf("SC_CLK_TCK")


def server_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    children[int(stat.read().rsplit(")", 1)[1].split()[1])].append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def rss_and_cpu(pids: list[int]) -> tuple[int, float]:
    """(summed VmRSS bytes, summed CPU seconds) of `pids`."""
    rss, cpu = 0, 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                rss += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, StopIteration):
            continue
    return rss, cpu


def machine_busy() -> float:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def open_sockets(pid: int) -> int:
    """Sockets the process holds (a worker: its client connections plus the shared listening socket)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return 0
    return sum(link.startswith("socket:") for link in links)


def describe_processes(root: int) -> list[str]:
    """One line per server process (the supervisor, its workers, multiprocessing's resource tracker):
    RSS, CPU seconds so far, and open sockets."""
    lines = []
    for pid in server_tree(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                words = b" ".join(cmdline.read().split(b"\0"))
        except OSError:
            continue
        role = "supervisor" if pid == root else "resource tracker" if b"resource_tracker" in words else "worker"
        rss, cpu = rss_and_cpu([pid])
        lines.append(
            f"server process {pid} ({role}): RSS {rss / 2**20:.0f} MiB, CPU {cpu:.1f} s, {open_sockets(pid)} sockets"
        )
    return lines


def child_figures(command: list[str], what: str, env: dict | None = None) -> tuple[dict, str]:
    """Run a measuring child process; (the JSON of its last `RESULT-JSON ` line, its stderr). Exits naming
    `what` with the child's error output when it fails."""
    import json
    import subprocess

    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT-JSON ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT-JSON ")), result.stderr


def copy_seconds(path, scratch) -> float:
    """Seconds to copy `path` once (to `scratch`, removed), what an atomic rewrite of it costs."""
    import shutil
    import time

    started = time.perf_counter()
    shutil.copyfile(path, scratch)
    seconds = time.perf_counter() - started
    os.unlink(scratch)
    return seconds
