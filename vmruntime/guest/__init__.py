"""guest: what runs inside a sandbox's VM, and how the host builds and talks to it.

What it is: the PID 1 agent (C sources in ``agent/``, compiled static by ``build.py``),
its wire protocol (``protocol.py``, spec in docs/agent-protocol.md), the guest kernel
(Debian's cloud kernel, ``kernel.py``) and the initramfs that boots it
(``initramfs.py``); ``assets.py`` makes all of them ready in one call and prunes old
ones. ``python -m vmruntime.guest prepare`` runs at setup time.

Who uses it: sandboxes (:mod:`vmruntime.vm`: the agent client speaks the protocol,
the QEMU driver boots the kernel and initramfs), ``vmr doctor`` and ``vmr image
prune``.
"""
