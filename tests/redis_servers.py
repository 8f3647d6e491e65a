"""Real ``redis-server`` processes for the tests: a standalone server and a 3-master cluster
on free loopback ports, without persistence, stopped when the test is done with them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
HOST = "127.0.0.1"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster: bool = False) -> int:
    """A free loopback port (for a cluster node, its bus port ``port + 10000`` too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not cluster or (port + 10000 <= 65535 and _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port")


class RedisServer:
    """One ``redis-server`` in ``workdir``; ``start`` again after ``kill`` reuses its port."""

    def __init__(self, workdir: Path, *, cluster: bool = False, args: tuple[str, ...] = ()):
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir = workdir
        self.cluster = cluster
        self.args = args
        self.port = free_port(cluster=cluster)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(HOST, self.port, socket_timeout=5)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir),
               "--logfile", str(self.workdir / f"redis-{self.port}.log"), *self.args]
        if self.cluster:
            conf = self.workdir / f"nodes-{self.port}.conf"
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(conf),
                    "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return self
            if self.proc.poll() is not None or time.monotonic() > end:
                log = self.workdir / f"redis-{self.port}.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.poll() is None:  # stopped with SIGSTOP
            self.signal(signal.SIGCONT)
            self.kill()


class RedisClusterServers:
    """Three masters, no replicas, all 16384 slots assigned (``redis-cli --cluster create``)."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli is not installed")
        self.nodes = [RedisServer(workdir, cluster=True) for _ in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> RedisClusterServers:
        for n in self.nodes:
            n.start()
        assert REDIS_CLI is not None
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s)
        return self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 30.0) -> RedisClusterServers:
        """Until every node says cluster_state:ok (all slots served, no node failing)."""
        end = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                if all(n.client().cluster("info")["cluster_state"] == "ok" for n in self.nodes):
                    return self
            if time.monotonic() > end:
                raise RuntimeError("the Redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@contextlib.contextmanager
def standalone(workdir: Path, *args: str) -> Iterator[RedisServer]:
    server = RedisServer(workdir, args=args).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def cluster(workdir: Path) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(workdir)
    try:
        yield servers.start()
    finally:
        servers.stop()
