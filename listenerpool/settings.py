"""All tunables of the pool in one pydantic-settings class (environment prefix ``LP_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from listenerpool.allowlist import Allowlist
from listenerpool.auth import split_secrets
from listenerpool.errors import ListenerPoolError
from listenerpool.redis_url import parse_redis_url

MIN_API_TOKEN_CHARS = 16
MIN_SIGNING_KEY_CHARS = 32


class SettingsError(ListenerPoolError):
    """A setting has a value the pool cannot run with; the message names the setting."""


class Settings(BaseSettings):
    """Settings shared by workers, gateways and the CLI.

    Durations are in seconds (floats allowed), sizes in bytes. Construct with :func:`load_settings`
    to turn validation failures into one readable :class:`SettingsError`.
    """

    model_config = SettingsConfigDict(
        env_prefix="LP_", extra="forbid", frozen=True, env_ignore_empty=True
    )

    redis_url: str | None = Field(
        default=None,
        description="Redis of the pool (required by workers): redis://host:port[/db] for one "
        "server; redis+cluster://h1:p1,h2:p2 for a Redis Cluster (any reachable nodes); "
        "redis+sentinel://[:password@]h1:p1,h2:p2/<master-name>[/db] for a primary watched by "
        "Sentinels (rediss... for TLS). Redis 7 or later: live events use sharded pub/sub.",
    )
    lease_ttl: float = Field(default=10.0, gt=0.2, description="Lease time to live (s).")
    lease_margin: float | None = Field(
        default=None,
        gt=0,
        description="Self-fence this long before the lease would expire (s); default ttl/5.",
    )
    reconcile_interval: float | None = Field(
        default=None,
        gt=0,
        description="Longest reconciler sleep (s), default and maximum ttl/3; "
        "it also wakes at the next lease deadline.",
    )
    idle_timeout: float = Field(
        default=45.0, gt=0, description="No bytes from the upstream for this long: reconnect (s)."
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Upstream connect timeout (s).")
    connect_concurrency: int = Field(
        default=500,
        ge=1,
        description="Upstream connections a worker opens (resolve, connect, TLS) at once; more "
        "wait their turn, so that a worker taking thousands of sessions keeps its loop free "
        "for lease renewals.",
    )
    head_timeout: float = Field(
        default=30.0,
        gt=0,
        description="The upstream's complete response head must arrive within this long (s).",
    )
    upstream_allow: str | None = Field(
        default=None,
        description=(
            "Comma-separated upstream allowlist: host names, *.wildcards, IPs and CIDRs. "
            "Unset: any address except link-local, cloud metadata, multicast and unspecified."
        ),
    )
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
    restore_bytes: int = Field(
        default=32 * 1024,
        ge=0,
        description="Most memory per session those recent events may take, each counted as its "
        "type, data and id plus 300 bytes; the oldest go first beyond it.",
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
    keep_alive: int = Field(
        default=75,
        ge=1,
        description="An idle HTTP/1.1 connection to the gateway is closed after this (s).",
    )
    ws_compression: bool = Field(
        default=False,
        description=(
            "permessage-deflate on WebSocket connections whose client offers it (browsers do)."
        ),
    )
    stream_check_interval: float = Field(
        default=20.0,
        gt=0,
        description="How often followed sessions are checked for lost live messages (s).",
    )
    host: str = Field(
        default="127.0.0.1", description="Listen address of the gateway and a worker's metrics."
    )
    port: int = Field(default=8080, ge=0, le=65535, description="Gateway listen port.")
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest control request body."
    )
    max_batch: int = Field(
        default=1000, ge=1, le=100_000, description="Sessions one PUT /v1/sessions may claim."
    )
    max_clients: int = Field(
        default=10_000, ge=1, description="Event clients (SSE and WebSocket) per gateway process."
    )
    max_clients_per_session: int = Field(
        default=1000, ge=1, description="Event clients of one session per gateway process."
    )
    max_sessions_per_stream: int = Field(
        default=256,
        ge=1,
        le=4096,
        description="Sessions one multiplexed connection (/v1/stream) may follow at once.",
    )
    api_rate: float = Field(
        # High enough for a backend bringing thousands of sessions up at once; the limit is
        # there to stop a runaway caller, not to shape normal traffic.
        default=2000.0,
        ge=0,
        description="Control API requests per second per token or client address (0: no limit).",
    )
    api_burst: int = Field(
        default=4000, ge=1, description="Control API requests allowed in a burst per token."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    log_format: Literal["json", "console"] = Field(
        default="console", description="Log lines as JSON objects or console text."
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="A worker's HTTP port for /metrics, /healthz and /readyz (0: none).",
    )
    queue_name: str = Field(default="lp-listen", min_length=1, description="rq queue of jobs.")
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token(s) for the control API, comma-separated to rotate; unset: "
        "no auth and the gateway listens on loopback only.",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="Key(s) signing subscribe tokens, comma-separated; the first signs, any "
        "verifies. Set: following a session needs a subscribe token or an API token.",
    )
    subscribe_token_ttl: float = Field(
        default=300.0, gt=0, le=86_400, description="Default lifetime of subscribe tokens (s)."
    )

    # Field validators (not a model validator) so an error names the setting at fault; each
    # runs after the fields it compares with, which are declared before it.
    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_redis_url(value)  # raises ValueError naming what is wrong
        return value

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

    @field_validator("upstream_allow")
    @classmethod
    def _allowlist_parses(cls, value: str | None) -> str | None:
        Allowlist.parse(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("backoff_cap")
    @classmethod
    def _cap_above_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("backoff_base")
        if base is not None and value < base:
            raise ValueError(f"must be >= LP_BACKOFF_BASE ({base:g}s)")
        return value

    @field_validator("api_token")
    @classmethod
    def _tokens_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            tokens = split_secrets(value.get_secret_value())
            if not tokens:
                raise ValueError("is set but holds no token")
            if any(len(t) < MIN_API_TOKEN_CHARS for t in tokens):
                raise ValueError(f"each token needs at least {MIN_API_TOKEN_CHARS} characters")
        return value

    @field_validator("signing_key")
    @classmethod
    def _keys_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            keys = split_secrets(value.get_secret_value())
            if not keys:
                raise ValueError("is set but holds no key")
            if any(len(k) < MIN_SIGNING_KEY_CHARS for k in keys):
                raise ValueError(f"each key needs at least {MIN_SIGNING_KEY_CHARS} characters")
        return value

    @property
    def api_tokens(self) -> tuple[str, ...]:
        """The valid control API tokens (none: the control API is open)."""
        return split_secrets(self.api_token.get_secret_value() if self.api_token else None)

    @property
    def signing_keys(self) -> tuple[str, ...]:
        """The subscribe-token keys, the signing one first (none: subscribing is open)."""
        return split_secrets(self.signing_key.get_secret_value() if self.signing_key else None)

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
    def allowlist(self) -> Allowlist:
        """``upstream_allow`` parsed (validated when the settings were built)."""
        return Allowlist.parse(self.upstream_allow)

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
