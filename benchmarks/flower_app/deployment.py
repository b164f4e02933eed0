"""Drives Flower 1.42's deployment runtime for benchmarks/bench_round_overhead.py: a
SuperLink and N SuperNodes on loopback, `flwr run` of this folder's apps, and the peak RSS of
processes and their children. Not part of the Flower app (pyproject's fab-exclude): it runs
in the benchmark's own interpreter, standard library only, so it needs no Flower import."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

FLOWER_APP = Path(__file__).resolve().parent


# -- peak RSS of a process and its children --------------------------------------------


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (no psutil in either venv)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


class PeakRss(threading.Thread):
    """Samples VmHWM of some processes and all their descendants every `period` s; keeps
    each pid's largest reading, because a child (Flower's ServerApp) exits before the end."""

    def __init__(self, roots: list[int], period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.period = period
        self.peaks: dict[int, int] = {}
        self._stop_event = threading.Event()

    def read(self) -> None:
        tree = children()
        pending, seen = list(self.roots), set()
        while pending:
            pid = pending.pop()
            if pid in seen:
                continue
            seen.add(pid)
            pending += tree.get(pid, [])
            kib = status_kib(pid, "VmHWM")
            if kib:
                self.peaks[pid] = max(self.peaks.get(pid, 0), kib)

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.read()

    def stop(self) -> float:
        """Stop sampling; the summed peaks in MiB."""
        self.read()
        self._stop_event.set()
        self.join(timeout=5)
        return sum(self.peaks.values()) / 1024


def child_pid(command: str) -> int | None:
    """A child of this process by its command name (MosquittoProcess keeps its Popen private)."""
    for pid in children().get(os.getpid(), []):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == command:
                return pid
        except OSError:
            continue
    return None


def wait_until(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds:.0f} s")
        time.sleep(0.2)


# -- Flower 1.42 -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _start_superlink(start: Any, binaries: Path, home: Path) -> tuple[Any, int]:
    """A SuperLink on a free port, written into the CLI's config; another port if one was
    taken between the probe and the bind (other benchmarks share the machine)."""
    for _ in range(3):
        port = _free_port()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        superlink = start(
            "superlink",
            str(binaries / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--port",
            str(port),
        )
        deadline = time.monotonic() + 120
        while superlink.poll() is None and time.monotonic() < deadline:
            if _port_open(port):
                return superlink, port
            time.sleep(0.2)
        _end_session(superlink)
    raise RuntimeError("flower-superlink did not listen (three ports tried)")


def run_flower(
    venv: Path, agents: int, rounds: int, params: int, root: Path, timeout: float
) -> dict[str, Any]:
    """SuperLink + N SuperNodes + `flwr run`; each process in its own session so that it and
    its children (SuperExec, ServerApp, ClientApps) are ended together."""
    binaries = venv / "bin"
    home = root / "flwr-home"
    home.mkdir(parents=True)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{binaries}:{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *command: str) -> subprocess.Popen[bytes]:
        with (root / f"{name}.log").open("ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        processes.append(process)
        return process

    sampler: PeakRss | None = None
    try:
        superlink, port = _start_superlink(start, binaries, home)
        sampler = PeakRss([superlink.pid])
        sampler.start()
        nodes = [superlink]
        for index in range(agents):
            nodes.append(
                start(
                    f"supernode-{index}",
                    str(binaries / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"partition-id={index} num-partitions={agents}",
                )
            )
        log = root / "superlink.log"

        def registered() -> bool:
            if any(process.poll() is not None for process in nodes):
                raise RuntimeError(f"a SuperLink or SuperNode exited (logs in {root})")
            return log.read_text(errors="replace").count("Activated node_id") >= agents

        wait_until(registered, timeout, f"{agents} SuperNodes registered")
        timing = root / "flower-timing.json"
        config = (
            f"num-server-rounds={rounds} min-nodes={agents} "
            f'update-size={params} timing-file="{timing}"'
        )
        flwr = start(
            "flwr-run",
            str(binaries / "flwr"),
            "run",
            str(FLOWER_APP),
            "bench",
            "--run-config",
            config,
            "--stream",
        )
        ended: list[float] = []

        def done() -> bool:
            """The ServerApp wrote its times; `flwr run` gone that long without them fails."""
            if timing.exists():
                return True
            if flwr.poll() is not None:
                ended.append(time.monotonic())
                if ended[-1] - ended[0] > 20:
                    raise RuntimeError(f"flwr run ended without round times (see {root})")
            return False

        wait_until(done, timeout, f"Flower, {agents} nodes, {rounds} rounds")
        rss = sampler.stop()
        sampler = None
        document = json.loads(timing.read_text())
        flwr.wait(timeout=60)
        return {
            "rounds": [{"round": r["round"], "wall": r["seconds"]} for r in document["rounds"]],
            "rss_mib": rss,
            "params": params,
        }
    finally:
        if sampler is not None:
            sampler.stop()
        for process in reversed(processes):
            _end_session(process)


def _end_session(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group this script created for it, then SIGKILL to whatever of
    the group is left (a SuperExec or an app process)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=15)
