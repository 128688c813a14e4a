"""Real servers for the production tests, started on 127.0.0.1 and stopped after: an MLflow
tracking server, and a TCP proxy that takes a server down and brings it back; and the run of
a CLI command that must succeed (or fail)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def cli(cmd: list[str], env: dict[str, str], cwd: Path, ok: bool = True) -> str:
    """Run `cmd`; assert it succeeded (or, with `ok=False`, failed); return its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode != 0, f"{cmd} should have failed:\n{proc.stdout[-2000:]}"
    return proc.stdout + proc.stderr


def wait_for_http(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until `url` answers 200; the server exiting first fails with the tail of its `log`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Outage:
    """A TCP proxy in front of `upstream` (host:port URL). `cut()` drops every connection and
    refuses new ones, which is what a server that died looks like to its clients; `restore()`
    listens again on the same port. `cut_after(n)` cuts once `n` more bytes went upstream,
    so a transfer is interrupted midway. The server behind it keeps its state, as a restarted
    S3 server keeps what it had stored."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.sent, self.limit = 0, None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._up = False
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.limit, self._up = None, True
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.05)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut_after(self, n_bytes: int) -> None:
        with self._lock:
            self.limit = self.sent + n_bytes

    def cut(self) -> None:
        with self._lock:
            self._up = False
            self._listener.close()
            for connection in self._connections:
                with suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._up:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._connections |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if upstream:
                    with self._lock:
                        self.sent += len(data)
                        over = self.limit is not None and self.sent >= self.limit
                    if over:
                        self.cut()
                        return
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, dest):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)


class MlflowServer:
    """`make mlflow-server`: `mlflow server` with a SQLite backend and artifacts at
    `artifacts` (an s3:// URI is served through the server, which reads its S3 endpoint
    from `env`)."""

    def __init__(self, folder: Path, artifacts: str, env: dict[str, str]) -> None:
        self.folder, self.artifacts, self.env = folder, artifacts, env
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [  # the README's `make mlflow-server`, on this port, store and artifacts
            "make", "-s", "-C", str(REPO), "-o", "install", "mlflow-server", f"BIN={BIN}",
            f"MLFLOW_PORT={self.port}", f"MLFLOW_ARTIFACTS={self.artifacts}",
            f"MLFLOW_BACKEND_STORE_URI=sqlite:///{self.folder / 'mlflow.db'}",
        ]  # fmt: skip
        with open(self.folder / "server.log", "ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        wait_for_http(f"{self.url}/health", self.process, timeout, self.folder / "server.log")

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crashed host would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@contextmanager
def mlflow_server(folder: Path, artifacts: str, env: dict[str, str]) -> Iterator[MlflowServer]:
    server = MlflowServer(folder, artifacts, env)
    server.start()
    try:
        yield server
    finally:
        server.kill()
