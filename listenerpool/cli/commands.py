"""The ``listenerpool`` command. It parses arguments and calls the library; nothing lives here."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import httpx

from listenerpool.auth import split_secrets
from listenerpool.client import Event, PoolClient, PoolClientError, Reset
from listenerpool.errors import ListenerPoolError
from listenerpool.logs import configure_logging
from listenerpool.settings import Settings, load_settings
from listenerpool.tasks import cancel_until_done

DEFAULT_GATEWAY = "http://127.0.0.1:8080"

# Flags that mirror LP_* settings, by the subcommands that take them.
SERVER_FLAGS: dict[str, tuple[str, type]] = {
    "--redis-url": ("redis_url", str),
    "--lease-ttl": ("lease_ttl", float),
    "--idle-timeout": ("idle_timeout", float),
    "--log-level": ("log_level", str),
    "--log-format": ("log_format", str),
}
GATEWAY_FLAGS = {"--host": ("host", str), "--port": ("port", int)}
WORKER_FLAGS = {
    "--capacity": ("worker_capacity", int),
    "--worker-id": ("worker_id", str),
    "--metrics-port": ("metrics_port", int),
}


class CliError(ListenerPoolError):
    """A user error reported as one line on stderr."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="listenerpool",
        description="A Redis-backed pool of long-lived upstream SSE listeners. Settings come "
        "from LP_* environment variables; flags override them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def server(name: str, help_text: str, *groups: dict[str, tuple[str, type]]) -> Any:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        for group in (SERVER_FLAGS, *groups):
            for flag, (setting, kind) in group.items():
                cmd.add_argument(
                    flag,
                    dest=setting,
                    type=kind,
                    default=None,
                    help=f"overrides LP_{setting.upper()}",
                )
        return cmd

    server("up", "Run a gateway and a worker in one process (embedded Redis without "
           "LP_REDIS_URL).", GATEWAY_FLAGS, WORKER_FLAGS)  # fmt: skip
    server("gateway", "Run a gateway (control API and event fan-out).", GATEWAY_FLAGS)
    server("worker", "Run a worker (the upstream readers).", WORKER_FLAGS)
    demo = server("demo", "Run the pool, a demo upstream and a few sessions, and say how to "
                  "watch them.", GATEWAY_FLAGS, WORKER_FLAGS)  # fmt: skip
    demo.add_argument("--sessions", type=int, default=3, help="demo sessions to start (3)")
    demo.add_argument("--upstream-port", type=int, default=0, help="demo upstream port (free)")
    up_demo = sub.add_parser(
        "upstream-demo",
        help="Run the AG-UI-style demo upstream (GET /events/{session}).",
        description="Run the AG-UI-style demo upstream (GET /events/{session}).",
    )
    up_demo.add_argument("--host", default="127.0.0.1")
    up_demo.add_argument("--port", type=int, default=8001)
    up_demo.add_argument("--rate", type=float, default=5.0, help="events/s per stream (5)")

    def client(name: str, help_text: str) -> Any:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "--gateway",
            default=os.environ.get("LP_GATEWAY_URL", DEFAULT_GATEWAY),
            help=f"gateway base URL (LP_GATEWAY_URL, default {DEFAULT_GATEWAY})",
        )
        cmd.add_argument(
            "--token",
            default=(split_secrets(os.environ.get("LP_API_TOKEN")) or (None,))[0],
            help="API token for a gateway that requires one (default: the first of LP_API_TOKEN)",
        )
        return cmd

    status = client("status", "Show sessions and workers.")
    status.add_argument("--limit", type=int, default=100, help="sessions to show (100)")
    status.add_argument("--interval", type=float, default=1.0, help="events/s sampling (1 s)")
    tail = client(
        "tail",
        "Print sessions' events live, resuming by seq after a disconnect. Several sessions "
        "share one connection, each line starting with its session id.",
    )
    tail.add_argument("sid", nargs="+")
    tail.add_argument(
        "--after", type=int, default=0, help="start after this seq, in every session (0: all)"
    )
    cancel = client("cancel", "Stop listening to a session, fleet-wide.")
    cancel.add_argument("sid")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    names = {setting for group in (SERVER_FLAGS, GATEWAY_FLAGS, WORKER_FLAGS)
             for setting, _ in group.values()}  # fmt: skip
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return load_settings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # inside the try: a reader gone shows up here at the latest
    except BrokenPipeError:
        # The reader of stdout went away (`listenerpool tail demo-1 | head -3`): stop quietly,
        # as coreutils do. They die of SIGPIPE, which a shell reports as 128 + 13; Python
        # ignores SIGPIPE and gets EPIPE instead, so this exits with that same status after
        # unwinding normally (child processes stopped): unseen in a plain pipeline, where the
        # last command's status counts, and under `set -o pipefail` the same as for `cat`.
        # stdout now points at /dev/null, so the interpreter's last flush of what is still
        # buffered does not fail again with an "Exception ignored" message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except (ListenerPoolError, ValueError) as exc:
        from listenerpool.cli.launch import STARTUP_FAILURE, StartupError

        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, StartupError):
            return STARTUP_FAILURE
        return 2 if not isinstance(exc, PoolClientError) else 1
    except httpx.TransportError as exc:
        print(f"error: cannot reach the gateway: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    command = args.command
    if command in ("status", "tail", "cancel"):
        return asyncio.run(until_interrupted(CLIENT_COMMANDS[command](args)))
    return serve(command, args)


def serve(command: str, args: argparse.Namespace) -> int:
    """A server command; every port it will listen on is checked before anything starts."""
    from listenerpool.cli import launch

    if command == "upstream-demo":
        from listenerpool.cli.demo_upstream import serve_demo_upstream

        launch.check_ports(launch.listeners_for(command, None, args), "nothing was started")
        configure_logging("INFO")
        print(f"demo upstream on http://{args.host}:{args.port}/events/<session>", flush=True)
        asyncio.run(
            launch.until_signalled(serve_demo_upstream(args.host, args.port, rate=args.rate))
        )
        return 0
    settings = settings_from(args)
    if command in ("gateway", "worker") and not settings.redis_url:
        raise CliError(f"LP_REDIS_URL (or --redis-url) is required for `listenerpool {command}`")
    launch.check_ports(launch.listeners_for(command, settings, args), "nothing was started")
    configure_logging(settings.log_level, settings.log_format)
    # From the moment a child redis-server may exist, a signal must stop it rather than kill
    # this process on the spot; within the event loop, stop_on_signals takes over.
    with (
        launch.DeferredSignals().installed() as signals,
        launch.redis_for(settings, lambda line: print(line, flush=True)) as settings,
    ):
        signals.raise_if_received()
        asyncio.run(launch.serve_command(command, settings, args))
    return 0


async def until_interrupted(command: Coroutine[Any, Any, int]) -> int:
    """Run a client command until it ends, or until SIGINT/SIGTERM stops it (status 130).

    asyncio.run's own SIGINT handling cancels the command once, and a read under httpx's
    timeouts can absorb that one cancellation (the command then runs on, as `tail` did);
    this cancels it until it is done."""
    from listenerpool.cli import launch

    async with launch.stop_on_signals() as stop:
        task = asyncio.ensure_future(command)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if task.done():
            return task.result()
        await cancel_until_done(task)
        return 130


async def cmd_status(args: argparse.Namespace) -> int:
    async with PoolClient(args.gateway, token=args.token) as client:
        workers = (await client.workers())["workers"]
        first = (await client.sessions(limit=args.limit))["sessions"]
        started = time.monotonic()
        await asyncio.sleep(args.interval)  # two samples make a rate
        second = {s["sid"]: s for s in (await client.sessions(limit=args.limit))["sessions"]}
        elapsed = time.monotonic() - started
    print(f"workers ({len(workers)})")
    print(_table(["id", "load", "capacity", "host", "pid", "heartbeat"],
                 [[w["id"], w["load"], w["capacity"], w["host"], w["pid"],
                   f"{w['heartbeat_age_s']}s ago"] for w in workers]))  # fmt: skip
    rows = []
    for s in first:
        now = second.get(s["sid"], s)
        rate = max(0, now["seq"] - s["seq"]) / elapsed if elapsed > 0 else 0.0
        rows.append([now["sid"], now["state"], now["owner"] or "-", now["epoch"], now["seq"],
                     now["retries"], f"{rate:.1f}", now["last_error"][:40]])  # fmt: skip
    print(f"\nsessions ({len(rows)})")
    print(
        _table(["sid", "state", "owner", "epoch", "seq", "retries", "events/s", "last error"], rows)
    )
    return 0


async def cmd_tail(args: argparse.Namespace) -> int:
    sids: list[str] = args.sid
    several = len(sids) > 1
    async with PoolClient(args.gateway, token=args.token) as client:
        items = (
            client.stream(sids, after=dict.fromkeys(sids, args.after))
            if several
            else client.events(sids[0], after=args.after)
        )
        async for item in items:
            whose = f"{item.sid}\t" if several else ""
            if isinstance(item, Reset):
                print(f"{whose}-- history starts at seq {item.first_seq}: events after "
                      f"{item.after} up to it are gone --", flush=True)  # fmt: skip
            elif isinstance(item, Event):
                print(f"{whose}{item.seq}\t{item.event}\t{item.data}", flush=True)
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with PoolClient(args.gateway, token=args.token) as client:
        await client.cancel(args.sid)
    print(f"cancelled {args.sid}")
    return 0


CLIENT_COMMANDS = {"status": cmd_status, "tail": cmd_tail, "cancel": cmd_cancel}


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    )


if __name__ == "__main__":
    sys.exit(main())
