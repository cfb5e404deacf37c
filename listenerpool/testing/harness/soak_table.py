"""The one table a soak run prints (Markdown, so it can go into the docs as it is)."""

from __future__ import annotations

from listenerpool.testing.harness.fault_kinds import KINDS
from listenerpool.testing.harness.soak import SoakResult, median, percentile

__all__ = ["format_table", "headline"]

FAILOVER_LABELS = {
    "worker_kill": "failover after worker SIGKILL → listening elsewhere",
    "worker_stop": "failover after worker SIGSTOP → listening elsewhere",
    "worker_term": "hand-over after worker SIGTERM → listening elsewhere",
    "worker_partition": "failover after worker cut off from Redis → listening elsewhere",
    "redis_lose_data": "Redis data loss → session re-asserted and listening",
    "spec_change_notice_lost": "spec change, control channel cut → upstream read with it",
    "primary_kill": "primary SIGKILL, replica promoted → listening and delivering",
    "cluster_failover": "CLUSTER FAILOVER → listening and delivering",
    "cluster_failover_force": "CLUSTER FAILOVER FORCE → listening and delivering",
    "slot_migrate": "slot migrated → listening and delivering",
    "shard_lost": "shard lost, back empty → re-asserted, listening and delivering",
    "sentinel_primary_kill": "primary SIGKILL, Sentinel promoted → listening and delivering",
    "sentinel_kill": "Sentinel SIGKILL → listening and delivering",
}


def headline(result: SoakResult) -> str:
    c = result.config
    return (
        f"chaos soak on {c.redis} Redis: {c.duration:g} s of faults "
        f"({result.elapsed:.0f} s in all), "
        f"{c.gateways} gateways, {c.workers} workers, {c.sessions} sessions at "
        f"{c.rate:g} events/s each; clients follow the first {c.followed} sessions on every "
        f"gateway ({c.followed * c.gateways} clients; the others are checked in Redis only); "
        f"lease ttl {c.lease_ttl:g} s, idle timeout {c.idle_timeout:g} s, seed {c.seed}"
    )


def _times(values: list[float], per_fault: list[float]) -> str:
    if not values:
        return "—"
    text = (
        f"{median(values):.2f} / {percentile(values, 0.99):.2f} / {max(values):.2f} s "
        f"({len(values)} sessions)"
    )
    if per_fault:
        text += (
            f"; all of a fault's sessions: {median(per_fault):.2f} / "
            f"{percentile(per_fault, 0.99):.2f} / {max(per_fault):.2f} s ({len(per_fault)} faults)"
        )
    return text


def format_table(result: SoakResult) -> str:
    t = result.totals
    rows: list[tuple[str, str]] = []
    for kind in KINDS:
        if kind in result.config.fault_kinds:
            rows.append((f"faults: {kind}", str(result.injected.get(kind, 0))))
    rows.append(("faults: total", str(sum(result.injected.values()))))
    if "spec_change_notice_lost" in result.config.fault_kinds:
        rows.append(("spec changes PUT (whose 'reconnect' notice no worker heard)",
                     f"{result.spec_changes} ({result.spec_notices_missed})"))  # fmt: skip
    rows.append(("events emitted by the upstream", f"{t.emitted:,}"))
    stored = f"{t.stored:,}"
    if t.history_dropped:
        stored += f" (+{t.history_dropped:,} gone with Redis data, delivered before the loss)"
    rows.append(("events stored in the Redis streams at the end", stored))
    rows.append(
        ("events delivered to clients (expected)", f"{t.delivered:,} ({t.expected_deliveries:,})")
    )
    rows.append(("**lost**", str(t.lost)))
    rows.append(
        ("**lost with a reset notice (gone from the history first)**", str(t.lost_announced))
    )
    rows.append(("**duplicated**", str(t.duplicated)))
    rows.append(("**out of order**", str(t.out_of_order)))
    rows.append(("**seq ≠ upstream event number**", str(t.renumbered)))
    rows.append(("**events published by a stale epoch**", str(t.stale_epoch)))
    paused = ""
    if t.overlaps_paused:
        paused = (
            f" (+{t.overlaps_paused} whose older connection belonged to a SIGSTOPped worker, "
            f"closed at most {max(t.paused_close_after_wake):.2f} s after SIGCONT)"
        )
    rows.append(
        ("**moments with two upstream connections for one session**", f"{t.overlaps}{paused}")
    )
    rows.append(("**reset notices to clients**", str(t.resets)))
    rows.append(("**sessions dropped**", str(result.sessions_dropped)))
    for kind, label in FAILOVER_LABELS.items():
        if kind in result.config.fault_kinds:
            times = _times(result.failover.get(kind, []), result.recovered_all.get(kind, []))
            rows.append((f"{label} p50 / p99 / max", times))
    rows.append(
        ("**sessions not listening again within 60 s**", str(sum(result.not_recovered.values())))
    )
    if "spec_change_notice_lost" in result.config.fault_kinds:
        rows.append(("**spec changes still read on the old spec a lease ttl after the PUT**",
                     str(result.spec_stale_after_ttl)))  # fmt: skip
    rows.append(("**readers on a stale spec at the end (not the last PUT's)**",
                 str(result.stale_spec_readers)))  # fmt: skip
    rows.append(("**upstream connections left after cancelling every session**",
                 str(result.upstream_open_after_cancel)))  # fmt: skip
    rows.append(("**readers left in workers**", str(result.readers_left)))
    rows.append(("**worker fds other than sockets above the start**",
                 str(result.worker_fds_above_baseline)))  # fmt: skip
    rows.append(("**gateway client sockets left**", str(result.gateway_client_sockets_left)))
    rows.append(("**clients that failed**", str(result.client_failures)))
    rows.append(("client retries of \"unknown session\" after data loss",
                 str(result.unknown_retries)))  # fmt: skip
    if result.not_steady:
        rows.append(("data losses injected while a session had no reader", str(result.not_steady)))
    if result.not_caught_up:
        rows.append(("sessions whose stream never caught up", str(result.not_caught_up)))
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)
