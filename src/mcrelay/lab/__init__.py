"""Network-namespace lab and traffic tools for tests, the demo and benchmarks.

``Lab``/``StandardLab`` (``mcrelay.lab.netns``) build throwaway namespaces
joined by veth pairs; ``mcrelay.lab.traffic`` sends and receives numbered UDP
datagrams and reports what arrived (count, TTL, TOS, byte-identical payloads).

Names are loaded lazily so ``python -m mcrelay.lab.traffic`` does not import
the module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcrelay.lab import netns, traffic
    from mcrelay.lab.netns import (
        Endpoint,
        Lab,
        LabError,
        Link,
        LinkSpec,
        ReceiverProcess,
        StandardLab,
        auto_link_spec,
        wait_for,
    )
    from mcrelay.lab.traffic import (
        PacketRecord,
        ReceiveResult,
        SendResult,
        TrafficError,
        make_payload,
        parse_payload,
        receive,
        send,
    )

_NETNS = {
    "Endpoint",
    "Lab",
    "LabError",
    "Link",
    "LinkSpec",
    "ReceiverProcess",
    "StandardLab",
    "auto_link_spec",
    "wait_for",
}
_TRAFFIC = {
    "PacketRecord",
    "ReceiveResult",
    "SendResult",
    "TrafficError",
    "make_payload",
    "parse_payload",
    "receive",
    "send",
}

__all__ = [
    "Endpoint",
    "Lab",
    "LabError",
    "Link",
    "LinkSpec",
    "PacketRecord",
    "ReceiveResult",
    "ReceiverProcess",
    "SendResult",
    "StandardLab",
    "TrafficError",
    "auto_link_spec",
    "make_payload",
    "netns",
    "parse_payload",
    "receive",
    "send",
    "traffic",
    "wait_for",
]


def __getattr__(name: str) -> Any:
    if name in ("netns", "traffic"):
        return importlib.import_module(f"mcrelay.lab.{name}")
    if name in _NETNS:
        return getattr(importlib.import_module("mcrelay.lab.netns"), name)
    if name in _TRAFFIC:
        return getattr(importlib.import_module("mcrelay.lab.traffic"), name)
    raise AttributeError(f"module 'mcrelay.lab' has no attribute {name!r}")
