"""docker-compose.yml without Docker: every service's command runs as a local process with the
compose environment (hostnames and ports remapped to loopback and free ports), then the
failover tour runs against it: a session through gateway 1, a WebSocket client on gateway 2,
the worker holding the session SIGKILLed, the session resumed elsewhere with no gap."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.asyncio.client import connect as ws_connect

from listenerpool.testing.redis_server import free_port
from tests.conftest import ROOT, eventually

pytestmark = pytest.mark.timeout(120)
BIN = Path(sys.executable).parent
CONTAINER_PORTS = {"redis": 6379, "upstream": 8001}  # reached by other services by name
# What the operator exports before `docker compose up`, as the file's header asks.
OPERATOR_ENV = {"LP_API_TOKEN": "compose-api-token-0123", "LP_SIGNING_KEY": "s" * 32}
_VARIABLE = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` substitution."""

    def value(match: re.Match[str]) -> str:
        name, kind, arg = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise AssertionError(f"compose would refuse to start: {name}: {arg}")
        return arg or ""

    return _VARIABLE.sub(value, text)


class ComposeStack:
    """The compose services as local processes."""

    def __init__(self, spec: dict[str, Any], tmp_path: Path, operator_env: dict[str, str]) -> None:
        self.spec = spec
        self.operator_env = operator_env
        self.tmp_path = tmp_path
        self.ports = {name: free_port() for name in spec["services"]}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def local(self, text: str) -> str:
        """A compose value with service hostnames and container ports made local."""
        for name, port in CONTAINER_PORTS.items():
            text = text.replace(f"{name}:{port}", f"127.0.0.1:{self.ports[name]}")
        return text

    def command(self, name: str) -> list[str]:
        service = self.spec["services"][name]
        args = [str(a) for a in service["command"]]
        if name == "redis":
            args = [a if a != "6379" else str(self.ports[name]) for a in args]
            return [*args, "--bind", "127.0.0.1", "--dir", str(self.tmp_path), "--save", ""]
        assert args[0] == "listenerpool", f"{name}: unexpected command {args}"
        args[0] = str(BIN / "listenerpool")
        if "--port" in args:
            args[args.index("--port") + 1] = str(self.ports[name])
        return [a if a != "0.0.0.0" else "127.0.0.1" for a in args]

    def environment(self, name: str) -> dict[str, str]:
        env = {"PATH": f"{BIN}:/usr/bin:/bin"}
        for key, value in (self.spec["services"][name].get("environment") or {}).items():
            env[key] = self.local(interpolate(str(value), self.operator_env))
        if "LP_PORT" in env:
            env["LP_PORT"] = str(self.ports[name])
        if env.get("LP_HOST") == "0.0.0.0":
            env["LP_HOST"] = "127.0.0.1"
        return env

    def start(self, name: str) -> None:
        with open(self.tmp_path / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                self.command(name), env=self.environment(name), cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def healthcheck(self, name: str) -> bool:
        check = self.spec["services"][name].get("healthcheck")
        if not check:
            return True
        args = [str(a) for a in check["test"]][1:]  # drop "CMD"
        args = [a.replace(":8080/", f":{self.ports[name]}/") for a in args]
        if args[0] == "python":
            args[0] = sys.executable
        if args[0] == "redis-cli":
            # Options go before the command: after it they are the command's arguments, and
            # the check would ask whatever Redis listens on the default port instead.
            args[1:1] = ["-p", str(self.ports[name])]
        return subprocess.run(args, capture_output=True, timeout=10).returncode == 0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ComposeStack]:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    s = ComposeStack(spec, tmp_path, OPERATOR_ENV)
    yield s
    s.stop()


def wait_healthy(stack: ComposeStack, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not stack.healthcheck(name):
        proc = stack.procs[name]
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (stack.tmp_path / f"{name}.log").read_text(errors="replace")
            raise AssertionError(f"{name} not healthy:\n{log[-2000:]}")
        time.sleep(0.1)


def test_compose_file_describes_the_stack() -> None:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert sorted(services) == [
        "gateway-1", "gateway-2", "redis", "upstream", "worker-1", "worker-2", "worker-3",
    ]  # fmt: skip
    assert "--appendonly" in services["redis"]["command"]
    published = [services[g]["ports"][0].split(":")[0] for g in ("gateway-1", "gateway-2")]
    assert len(set(published)) == 2
    for name in ("gateway-1", "gateway-2"):
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"])
    assert (ROOT / "Dockerfile").exists()
    # The gateways listen on all interfaces, so compose refuses to start them without a token.
    gateway_env = {k: str(v) for k, v in services["gateway-1"]["environment"].items()}
    assert gateway_env["LP_HOST"] == "0.0.0.0"
    with pytest.raises(AssertionError, match="LP_API_TOKEN"):
        interpolate(gateway_env["LP_API_TOKEN"], {})


async def test_failover_tour_on_the_compose_stack(stack: ComposeStack) -> None:
    stack.start("redis")
    await asyncio.to_thread(wait_healthy, stack, "redis")
    for name in ("upstream", "gateway-1", "gateway-2", "worker-1", "worker-2", "worker-3"):
        stack.start(name)
    for name in ("gateway-1", "gateway-2"):
        await asyncio.to_thread(wait_healthy, stack, name)
    gw1 = f"http://127.0.0.1:{stack.ports['gateway-1']}"
    gw2 = f"127.0.0.1:{stack.ports['gateway-2']}"
    upstream = stack.local("http://upstream:8001/events/tour")

    auth = {"Authorization": f"Bearer {OPERATOR_ENV['LP_API_TOKEN']}"}
    async with httpx.AsyncClient(base_url=gw1, timeout=10) as http:

        async def upstream_up() -> bool:
            try:
                return (await http.get(upstream.replace("/events/tour", "/healthz"))).is_success
            except httpx.TransportError:
                return False

        await eventually(upstream_up, 20, "demo upstream did not start")
        assert (await http.put("/v1/sessions/tour", json={"url": upstream})).status_code == 401
        put = await http.put("/v1/sessions/tour", json={"url": upstream}, headers=auth)
        assert put.status_code == 201
        http.headers.update(auth)

        async def owner() -> str:
            status = (await http.get("/v1/sessions/tour")).json()
            return str(status["owner"]) if status["state"] == "listening" else ""

        async def has_owner() -> bool:
            return bool(await owner())

        await eventually(has_owner, 20, "no worker took the session")
        first_owner = await owner()

        seqs: list[int] = []
        # A browser's token, issued by gateway 1, is honoured by gateway 2 (shared key).
        issued = await http.post("/v1/sessions/tour/subscribe-token")
        token = issued.json()["token"]
        async with ws_connect(f"ws://{gw2}/v1/sessions/tour/events?after=0&token={token}") as ws:
            while len(seqs) < 10:
                seqs.append(json.loads(await ws.recv())["seq"])
            stack.procs[first_owner].send_signal(signal.SIGKILL)

            async def moved() -> bool:
                now = await owner()
                return bool(now) and now != first_owner

            # The lease must lapse (LP_LEASE_TTL in the compose file) and a reconciler wake (a
            # third of it): several of those is a deadline a loaded machine meets.
            ttl = float(stack.spec["x-pool-env"]["LP_LEASE_TTL"])
            await eventually(moved, 4 * ttl + ttl / 3, "the session did not fail over")
            target = seqs[-1] + 20
            while seqs[-1] < target:
                seqs.append(json.loads(await ws.recv())["seq"])
        assert seqs == list(range(1, len(seqs) + 1)), "the client saw a gap or a duplicate"
        status = (await http.get("/v1/sessions/tour")).json()
        assert status["epoch"] >= 2
