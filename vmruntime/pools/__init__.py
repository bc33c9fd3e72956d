"""pools: warm pools of ready sandboxes, handed out once each (see :mod:`.pool`), and
``vmr pool ls``.

Who uses it: the front doors (the Jupyter provisioner, Ray's sandbox actors), which
say how a member is made (a resume from a memory snapshot, or a boot) and what a claim
does to it. Public names: :class:`WarmPool`, :class:`PoolKey`, :class:`PoolMember`.
"""

from vmruntime.pools.pool import MemberMaker, PoolKey, PoolMember, WarmPool

__all__ = ["MemberMaker", "PoolKey", "PoolMember", "WarmPool"]
