"""What one gateway process holds: Redis clients, the control API and the fan-out hub."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.hub import FanoutHub
from gateway.limits import ClientLimits
from listenerpool.control import SessionControl
from listenerpool.metrics import GatewayMetrics
from listenerpool.settings import Settings


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    redis: Any
    control: SessionControl
    hub: FanoutHub
    clients: ClientLimits
    metrics: GatewayMetrics
