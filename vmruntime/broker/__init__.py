"""The virtio-fs broker: serves a host folder to a hostile guest (spec: docs/broker.md).

Public here: :class:`FuseHandler` (raw FUSE request in, raw reply out, no
transport) and :class:`BrokerOptions`. The transports (vhost-user for QEMU,
``/dev/fuse`` for a host mount point) and the broker process live beside it.
"""

from __future__ import annotations

from vmruntime.broker.handler import BrokerOptions, FuseHandler

__all__ = ["BrokerOptions", "FuseHandler"]
