"""All tunables of the pool in one pydantic-settings class (environment prefix ``LP_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from listenerpool.errors import ListenerPoolError


class SettingsError(ListenerPoolError):
    """A setting has a value the pool cannot run with; the message names the setting."""


class Settings(BaseSettings):
    """Settings shared by workers, gateways and the CLI.

    Durations are in seconds (floats allowed), sizes in bytes. Construct with :func:`load_settings`
    to turn validation failures into one readable :class:`SettingsError`.
    """

    model_config = SettingsConfigDict(env_prefix="LP_", extra="forbid", frozen=True)

    redis_url: str | None = Field(
        default=None, description="Redis URL of the pool (required by workers)."
    )
    lease_ttl: float = Field(default=10.0, gt=0.2, description="Lease time to live (s).")
    lease_margin: float | None = Field(
        default=None,
        gt=0,
        description="Self-fence this long before the lease would expire (s); default ttl/5.",
    )
    reconcile_interval: float | None = Field(
        default=None, gt=0, description="Reconciler period (s); default and maximum ttl/3."
    )
    idle_timeout: float = Field(
        default=45.0, gt=0, description="No bytes from the upstream for this long: reconnect (s)."
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Upstream connect timeout (s).")
    backoff_base: float = Field(default=0.5, gt=0, description="Backoff base delay (s).")
    backoff_cap: float = Field(default=30.0, gt=0, description="Backoff maximum delay (s).")
    worker_capacity: int = Field(default=10_000, ge=1, description="Readers per worker process.")
    worker_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Worker id; default random."
    )
    history_maxlen: int = Field(default=10_000, ge=1, description="Events kept per session.")
    history_ttl: float = Field(
        default=24 * 3600.0, gt=0, description="Idle history and state expire after this (s)."
    )
    restore_events: int = Field(
        default=64,
        ge=0,
        description="Recent events per session a worker keeps in memory to write back into the "
        "history after Redis lost its data.",
    )
    max_event_bytes: int = Field(default=1 << 20, ge=64, description="Largest accepted event.")
    max_redirects: int = Field(default=5, ge=0, description="Upstream redirects followed.")
    client_queue: int = Field(
        default=1024, ge=1, description="Events queued per client before it counts as too slow."
    )
    client_queue_bytes: int = Field(
        default=1 << 20, ge=1024, description="Bytes queued per client before it is too slow."
    )
    client_heartbeat: float = Field(
        default=15.0, gt=0, description="Heartbeat to idle clients (SSE comment, WS ping) (s)."
    )
    stream_check_interval: float = Field(
        default=20.0,
        gt=0,
        description="How often followed sessions are checked for lost live messages (s).",
    )
    host: str = Field(default="127.0.0.1", description="Gateway listen address.")
    port: int = Field(default=8080, ge=0, le=65535, description="Gateway listen port.")
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest control request body."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    queue_name: str = Field(default="lp-listen", min_length=1, description="rq queue of jobs.")

    # Field validators (not a model validator) so an error names the setting at fault; each
    # runs after the fields it compares with, which are declared before it.
    @field_validator("lease_margin")
    @classmethod
    def _margin_below_ttl(cls, value: float | None, info: ValidationInfo) -> float | None:
        ttl = info.data.get("lease_ttl")
        if value is not None and ttl is not None and value >= ttl * 2 / 3:
            raise ValueError(f"must be below 2/3 of LP_LEASE_TTL ({ttl:g}s)")
        return value

    @field_validator("reconcile_interval")
    @classmethod
    def _reconcile_within_ttl(cls, value: float | None, info: ValidationInfo) -> float | None:
        ttl = info.data.get("lease_ttl")
        if value is not None and ttl is not None and value > ttl / 3:
            raise ValueError(f"must be at most LP_LEASE_TTL/3 ({ttl / 3:g}s)")
        return value

    @field_validator("backoff_cap")
    @classmethod
    def _cap_above_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("backoff_base")
        if base is not None and value < base:
            raise ValueError(f"must be >= LP_BACKOFF_BASE ({base:g}s)")
        return value

    @property
    def renew_interval(self) -> float:
        """Leases are renewed three times per TTL so one lost renewal is survivable."""
        return self.lease_ttl / 3

    @property
    def fence_after(self) -> float:
        """Seconds after the last successful renewal at which a reader stops itself."""
        margin = self.lease_margin if self.lease_margin is not None else self.lease_ttl / 5
        return self.lease_ttl - margin

    @property
    def reconcile_period(self) -> float:
        return self.reconcile_interval or self.lease_ttl / 3


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus ``overrides``.

    Raises :class:`SettingsError` whose message names every bad setting as its ``LP_`` variable.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"])
            name = f"LP_{loc.upper()}" if loc else "settings"
            problems.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
