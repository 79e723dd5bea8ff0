"""Real server processes that a test or benchmark starts, kills and restarts itself, on free loopback ports.

* :class:`RedisProcess`: a redis-server, optionally persistent (AOF, ``appendfsync always``) so that
  data written before a ``kill -9`` is there after :meth:`~RedisProcess.start` again on the same port;
* :class:`MotoProcess`: moto's S3 server as a subprocess (in-memory: a kill loses every object);
* :class:`KvwireProcess`: ``kvwire serve`` (REST and gRPC) with the environment it is given, one
  process or a supervisor with ``KVWIRE_WORKERS`` serving children;
* :class:`KvwireWorkerProcess`: ``kvwire worker``, a standalone ingest worker on the Redis job queue.

Used by tests/faults, benchmarks/soak.py and benchmarks/serving.py. Every process gets its own port,
never a service the machine may run (such as a Redis on 6379), and a log file in its work directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any


def free_port() -> int:
    """A port the kernel reports free on 127.0.0.1 (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class ManagedProcess:
    """One subprocess that can be started, killed (SIGKILL), paused (SIGSTOP) and started again."""

    name = "process"

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    # -- to override

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def ready(self) -> bool:
        return port_open(self.port)

    # -- lifecycle

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and wait until it answers (raise with the log tail if it does not)."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's lifetime
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir
        )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.kill()
                raise RuntimeError(f"{self.name} on port {self.port} did not start:\n{tail}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a paused process must be able to die
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_log()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets open but answers nothing (a hung server)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisProcess(ManagedProcess):
    """redis-server on 127.0.0.1; ``persist`` keeps data across a kill (AOF, fsync on every write)."""

    name = "redis"

    def __init__(
        self, workdir: Path, port: int | None = None, *, persist: bool = True, extra: tuple[str, ...] = ()
    ):
        super().__init__(workdir, port)
        self.persist = persist
        self.extra = extra

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no"]
        cmd += ["--dir", str(self.workdir)]
        if self.persist:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return [*cmd, *self.extra]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class MotoProcess(ManagedProcess):
    """moto's S3 server (``python -m moto.server``); state is in memory and lost when it is killed."""

    name = "moto"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]


class ProxyProcess(ManagedProcess):
    """``benchmarks/tcpproxy.py`` from ``port`` to ``target_port``: kill it to make a live backend
    unreachable without losing its data, pause it to make every connection hang."""

    name = "proxy"

    def __init__(self, workdir: Path, target_port: int, port: int | None = None):
        super().__init__(workdir, port)
        self.target_port = target_port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        script = Path(__file__).with_name("tcpproxy.py")
        return [sys.executable, str(script), str(self.port), str(self.target_port)]


class KvwireProcess(ManagedProcess):
    """``kvwire serve`` with ``KVWIRE_*`` settings from ``env`` (REST on ``port``, gRPC on ``grpc_port``)."""

    name = "kvwire"

    def __init__(
        self, workdir: Path, env: dict[str, str], port: int | None = None, grpc_port: int | None = None
    ):
        super().__init__(workdir, port)
        self.grpc_port = grpc_port or free_port()
        self._env = env

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "kvwire.cli", "serve"]

    def env(self) -> dict[str, str]:
        ports = {"KVWIRE_PORT": str(self.port), "KVWIRE_GRPC_PORT": str(self.grpc_port)}
        return kvwire_env({**self._env, "KVWIRE_HOST": "127.0.0.1", **ports})

    def ready(self) -> bool:
        """Both ports open and ``/readyz`` answering 200: the store and the job queue answer too, so a
        test or benchmark starts on a server that can serve (``/healthz`` only says it is alive)."""
        if not (port_open(self.port) and port_open(self.grpc_port)):
            return False
        import httpx

        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def rss_and_threads(self) -> tuple[int, int]:
        """Resident memory (bytes) and thread count of the server process (psutil)."""
        import psutil

        p = psutil.Process(self.pid)
        return int(p.memory_info().rss), int(p.num_threads())

    def serving_children(self) -> list[Any]:
        """The supervisor's children (psutil processes) that listen on the REST port: with
        ``KVWIRE_WORKERS`` N, the N serving processes; with one process, none."""
        import psutil

        return [c for c in psutil.Process(self.pid).children() if listens(c, self.port)]

    def wait_serving(self, count: int, timeout_s: float) -> list[Any]:
        """Wait until ``count`` children serve (the supervisor answers once one does), then until
        every serving process is idle (each compiles the controller's planner at start); return them
        (psutil processes), the supervisor first when ``count`` > 1."""
        import psutil

        deadline = time.monotonic() + timeout_s
        processes = [psutil.Process(self.pid)]
        if count > 1:
            children = wait_until(
                lambda: (c := self.serving_children()) and len(c) >= count and c,
                timeout_s,
                f"kvwire serve --workers {count} to start every process",
                interval_s=0.1,
            )
            processes += children
        wait_idle(processes, deadline)
        return processes


class KvwireWorkerProcess(ManagedProcess):
    """``kvwire worker``: consumes the Redis job queue (``KVWIRE_JOBS_REDIS_URL`` in ``env``) with the
    configured model. Ready once it logs that it consumes (model loaded, profile calibrated or read)."""

    name = "kvwire-worker"

    def __init__(self, workdir: Path, env: dict[str, str]):
        super().__init__(workdir, port=0)
        self._env = env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "kvwire.cli", "worker"]

    def env(self) -> dict[str, str]:
        return kvwire_env(self._env)

    def ready(self) -> bool:
        return self.log_path.exists() and b" consuming " in self.log_path.read_bytes()


def kvwire_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without its ``KVWIRE_*`` variables, plus ``settings``, offline and
    unbuffered: the environment of a ``kvwire`` subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVWIRE_")}
    env.update(settings)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def listens(process: Any, port: int) -> bool:
    """Whether ``process`` (psutil) has a TCP socket listening on ``port``."""
    try:
        return any(c.status == "LISTEN" and c.laddr.port == port for c in process.net_connections("tcp"))
    except Exception:  # gone, or not ours to inspect
        return False


def wait_idle(processes: list[Any], deadline: float, interval_s: float = 0.5) -> None:
    """Wait until ``processes`` (psutil) use less than 5% of a core each over ``interval_s``;
    ``RuntimeError`` at ``deadline`` (``time.monotonic()``)."""

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in processes)

    before = cpu()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        now = cpu()
        if now - before < 0.05 * interval_s * len(processes):
            return
        before = now
    raise RuntimeError("the serving processes did not settle")


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``predicate()`` until it returns a truthy value; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
