"""Real broker servers for the tests, on loopback ports in the test's own folders: Redis and RabbitMQ."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"broker exited ({proc.returncode}): {log.read_text(errors='replace')[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"broker not listening on {port} in {timeout}s: {log.read_text(errors='replace')[-3000:]}")


class RedisServer:
    """redis-server with an append-only file synced at every write: it may be killed and started again."""

    def __init__(self, folder: Path, also_on: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (.ci/run installs it with apt-get)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.binds = ["127.0.0.1", *([also_on] if also_on else [])]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url_on(self, address: str) -> str:
        return f"redis://{address}:{self.port}/0"

    def start(self) -> None:
        log = self.folder / "redis.log"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.binds, "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(log),
             # A namespace's client comes over a private veth pair, not loopback: let it in without a password.
             "--protected-mode", "no" if len(self.binds) > 1 else "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, 20, log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self, seconds: float) -> None:
        """SIGSTOP, then SIGCONT: a broker that hangs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.proc.send_signal(signal.SIGCONT)


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    server = RedisServer(folder)
    try:
        yield server
    finally:
        server.kill()


# The script under Debian's wrapper: it runs as the test's user, with the test's folders (the wrapper
# switches to the rabbitmq user, who cannot enter them).
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class RabbitServer:
    """rabbitmq-server as a node of its own, with its data, logs and ports in the test's folder."""

    def __init__(self, folder: Path, also_on: str | None = None) -> None:
        if not os.access(SERVER, os.X_OK):
            pytest.skip("rabbitmq-server is not installed (.ci/run installs it with apt-get)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.node = f"apilogtest{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        dist = free_port()
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_NODE_IP_ADDRESS": "0.0.0.0" if also_on else "127.0.0.1",  # noqa: S104 - a test namespace's link
                    "RABBITMQ_DIST_PORT": str(dist),
                    "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"), "RABBITMQ_LOG_BASE": str(folder / "log"),
                    "RABBITMQ_PID_FILE": str(folder / "pid"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "plugins"),
                    "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"), "HOME": str(folder)}
        (folder / "plugins").write_text("[].\n")
        (folder / "rabbitmq.conf").write_text("loopback_users = none\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url_on(self, address: str) -> str:
        return f"amqp://guest:guest@{address}:{self.port}//"

    def start(self) -> None:
        log = self.folder / "server.out"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([SERVER], env=self.env, stdout=out, stderr=out,
                                         start_new_session=True)
        _wait_port(self.port, self.proc, 90, log)

    def kill(self) -> None:
        """SIGKILL to the whole node (the script and the Erlang VM it started); back once its port is closed."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                        return
                time.sleep(0.05)
            raise AssertionError(f"RabbitMQ still listens on {self.port} after SIGKILL")

    def pause(self, seconds: float) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.killpg(self.proc.pid, signal.SIGCONT)


class Namespace:
    """A network namespace joined to this one by a veth pair on private test addresses: a host of its own."""

    def __init__(self, index: int) -> None:
        self.name = f"apilogt{os.getpid()}x{index}"
        self.outer, self.inner = f"alo{os.getpid() % 10000}x{index}", f"ali{os.getpid() % 10000}x{index}"
        net = f"10.213.{index}"
        self.outer_ip, self.inner_ip = f"{net}.1", f"{net}.2"
        steps = [["ip", "netns", "add", self.name],
                 ["ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner],
                 ["ip", "link", "set", self.inner, "netns", self.name],
                 ["ip", "addr", "add", f"{self.outer_ip}/30", "dev", self.outer],
                 ["ip", "link", "set", self.outer, "up"],
                 ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.inner_ip}/30", "dev", self.inner],
                 ["ip", "netns", "exec", self.name, "ip", "link", "set", self.inner, "up"],
                 ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                self.close()
                pytest.skip(f"cannot make a network namespace here ({' '.join(step)}: {done.stderr.strip()})")

    def run(self) -> list[str]:
        """The prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def cut(self, down: bool) -> None:
        subprocess.run(["ip", "link", "set", self.outer, "down" if down else "up"], check=True)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
