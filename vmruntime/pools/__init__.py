"""pools: warm pools of ready sandboxes, handed out once each (see :mod:`.pool`), and
``vmr pool ls``.

Who uses it: the front doors (the Jupyter provisioner, Ray's sandbox actors), which
say how a member is made (a resume from a memory snapshot, or a boot) and what a claim
does to it. Public names: :class:`WarmPool`, :class:`PoolKey`, :class:`PoolMember`, and
for templates that share folders :func:`carried_shares` and :func:`stand_ins`.
"""

from vmruntime.pools.pool import MemberMaker, PoolKey, PoolMember, WarmPool
from vmruntime.pools.shares import carried_shares, stand_ins

__all__ = ["MemberMaker", "PoolKey", "PoolMember", "WarmPool", "carried_shares", "stand_ins"]
