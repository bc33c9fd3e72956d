"""broker: the virtio-fs broker, which serves a host folder to a hostile guest (spec:
docs/broker.md).

Who uses it: sandboxes start one broker process per shared folder or directory volume
(:mod:`vmruntime.vm.mounts`); tests and benchmarks serve it on a host mount.

Public here: :class:`FuseHandler` (raw FUSE request in, raw reply out, no transport)
and :class:`BrokerOptions`. The transports (vhost-user for QEMU, ``/dev/fuse`` for a
host mount point) and the broker process live beside it.
"""

from __future__ import annotations

from vmruntime.broker.handler import BrokerOptions, FuseHandler

__all__ = ["BrokerOptions", "FuseHandler"]
