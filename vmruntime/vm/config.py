"""What a sandbox should be, as one frozen value checked before anything is built.

Who calls it: everything that creates sandboxes builds a :class:`SandboxConfig`:
``Sandbox.create``'s keywords, ``vmr run``, the Jupyter provisioner and Ray actors;
the sandbox record stores it (docs/sandboxes.md) beside the image's
:class:`ExecDefaults`, so ``attach()`` runs commands as the image says.

What it promises: constructing a config does every check that costs nothing (types,
ranges, names, guest paths of mounts, a detached sandbox with ports) and raises
:class:`~vmruntime.errors.SandboxConfigError` (or ``MountError`` /
``InvalidReferenceError``) naming the field; so a bad request fails before a
directory, a layer, a broker or a VM exists. Checks that need the disk (the image is
cached, a host folder exists, the devices fit) are the first step of creation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vmruntime._ext4 import size_problem
from vmruntime.errors import SandboxConfigError
from vmruntime.images.manifest import ImageConfig, is_digest
from vmruntime.images.reference import parse_reference
from vmruntime.vm.mounts import Mount, check_guest_paths

DEFAULT_MEMORY_MIB = 512
DEFAULT_WRITABLE_SIZE = 4 << 30
# Generous: a TCG guest on a loaded 2-core CI machine boots in seconds, not minutes.
DEFAULT_BOOT_TIMEOUT = 120.0
MIN_MEMORY_MIB = 64
MAX_CPUS = 64  # more than microvm's interrupt routing is meant for; a typo, not a plan
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[^=\0]+")
Ports = Mapping[int, int] | Sequence[int]


@dataclass(frozen=True)
class ExecDefaults:
    """What an exec gets unless it says otherwise: the image config plus the sandbox's env."""

    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    def with_env(self, env: Mapping[str, str]) -> ExecDefaults:
        """These defaults with ``env`` over the image's environment."""
        return ExecDefaults({**self.env, **env}, self.cwd, self.user, self.entrypoint, self.cmd)

    def to_json(self) -> dict[str, Any]:
        return {"env": dict(self.env), "cwd": self.cwd, "user": self.user,
                "entrypoint": list(self.entrypoint), "cmd": list(self.cmd)}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ExecDefaults:
        return cls(dict(doc.get("env") or {}), str(doc.get("cwd") or "/"),
                   str(doc.get("user") or ""), tuple(doc.get("entrypoint") or ()),
                   tuple(doc.get("cmd") or ()))  # fmt: skip

    @classmethod
    def from_image(cls, config: ImageConfig) -> ExecDefaults:
        """From an OCI image config: Env (``NAME=VALUE`` strings), WorkingDir, User,
        Entrypoint and Cmd."""
        pairs = (item.partition("=") for item in config.env)
        env = {name: value for name, _, value in pairs if name}
        return cls(env, config.working_dir or "/", config.user, tuple(config.entrypoint or ()),
                   tuple(config.cmd or ()))  # fmt: skip


@dataclass(frozen=True)
class SandboxConfig:
    """One sandbox request. ``ports`` maps guest ports to host ports on 127.0.0.1 (0: any
    free one); a sequence forwards each guest port from a free host port. ``mounts`` are
    :class:`~vmruntime.vm.mounts.Mount` values or ``"HOST:GUEST[:ro]"`` strings.

    ``env``, ``ports`` and ``name`` are the per-caller settings: they are applied after
    the machine has started (a warm pool boots sandboxes before it knows them).
    """

    image: str
    cpus: int = 1
    memory_mib: int = DEFAULT_MEMORY_MIB
    env: Mapping[str, str] = field(default_factory=dict)
    ports: Ports = ()
    mounts: Sequence[Mount | str] = ()
    name: str = ""
    writable_size: int = DEFAULT_WRITABLE_SIZE
    detached: bool = False
    keep: bool = False
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT

    def __post_init__(self) -> None:
        # Frozen: each field is normalised once, here, into an immutable form.
        set_ = object.__setattr__
        set_(self, "image", _image(self.image))
        set_(self, "cpus", _int_in("cpus", self.cpus, 1, MAX_CPUS))
        set_(self, "memory_mib", _int_in("memory_mib", self.memory_mib, MIN_MEMORY_MIB, 1 << 20))
        set_(self, "env", MappingProxyType(_env(self.env)))
        set_(self, "ports", MappingProxyType(_ports(self.ports)))
        set_(self, "mounts", tuple(_mounts(self.mounts)))
        set_(self, "name", _name(self.name))
        if (problem := size_problem(self.writable_size)) is not None:
            raise SandboxConfigError("writable_size", self.writable_size, problem)
        set_(self, "boot_timeout", _seconds("boot_timeout", self.boot_timeout))
        for flag in ("detached", "keep"):
            if not isinstance(getattr(self, flag), bool):
                raise SandboxConfigError(flag, getattr(self, flag), "want True or False")
        if self.detached and self.ports:
            reason = "a detached sandbox cannot forward ports (nobody would serve them)"
            raise SandboxConfigError("ports", dict(self.ports), reason)

    @property
    def port_map(self) -> Mapping[int, int]:
        """``ports`` as guest port → host port (0: any free one)."""
        assert isinstance(self.ports, Mapping)
        return self.ports

    def to_json(self) -> dict[str, Any]:
        """For the sandbox record (docs/sandboxes.md)."""
        return {
            "image": self.image, "cpus": self.cpus, "memory_mib": self.memory_mib,
            "env": dict(self.env), "ports": {str(g): h for g, h in self.port_map.items()},
            "mounts": [_mount_json(m) for m in self.mounts], "name": self.name,
            "writable_size": self.writable_size, "detached": self.detached,
            "keep": self.keep, "boot_timeout": self.boot_timeout,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SandboxConfig:
        values = dict(doc)
        values["ports"] = {int(g): int(h) for g, h in (doc.get("ports") or {}).items()}
        values["mounts"] = [Mount(m["host"], m["guest"], m["readonly"], m["kind"],
                                  m.get("transport", "vhost-user"))
                            for m in doc.get("mounts") or ()]  # fmt: skip
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in known})


def _mount_json(mount: Mount | str) -> dict[str, Any]:
    assert isinstance(mount, Mount)
    return {"kind": mount.kind, "host": str(mount.host), "guest": mount.guest,
            "readonly": mount.readonly, "transport": mount.transport}  # fmt: skip


def _image(image: object) -> str:
    if not isinstance(image, str) or not image:
        raise SandboxConfigError("image", image, "want an image reference or manifest digest")
    if not is_digest(image):
        parse_reference(image)  # InvalidReferenceError names what is wrong
    return image


def _int_in(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SandboxConfigError(name, value, "want a whole number")
    if not low <= value <= high:
        raise SandboxConfigError(name, value, f"want {low} to {high}")
    return value


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SandboxConfigError(name, value, "want a number of seconds above 0")
    return float(value)


def _env(env: object) -> dict[str, str]:
    if not isinstance(env, Mapping):
        raise SandboxConfigError("env", env, "want a mapping of names to values")
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise SandboxConfigError("env", key, "a name must be a non-empty string without '='")
        if not isinstance(value, str) or "\0" in value:
            raise SandboxConfigError(f"env[{key!r}]", value, "want a string without NUL")
    return dict(env)


def _ports(ports: object) -> dict[int, int]:
    if isinstance(ports, Mapping):
        wanted = dict(ports)
    elif isinstance(ports, Sequence) and not isinstance(ports, str | bytes):
        wanted = {port: 0 for port in ports}
        if len(wanted) != len(ports):
            raise SandboxConfigError("ports", ports, "a guest port is listed twice")
    else:
        raise SandboxConfigError("ports", ports, "want guest ports, or guest → host ports")
    for guest, host in wanted.items():
        if not _is_port(guest, 1) or not _is_port(host, 0):
            reason = "want guest 1-65535 and host 0-65535 (0: any free)"
            raise SandboxConfigError("ports", {guest: host}, reason)
    return wanted


def _is_port(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= 65535


def _mounts(mounts: object) -> list[Mount]:
    if isinstance(mounts, str | bytes) or not isinstance(mounts, Sequence):
        raise SandboxConfigError("mounts", mounts, "want a list of Mount or 'HOST:GUEST[:ro]'")
    parsed = [Mount.parse(item) if isinstance(item, str) else item for item in mounts]
    for item in parsed:
        if not isinstance(item, Mount):
            raise SandboxConfigError("mounts", item, "not a Mount")
    check_guest_paths(parsed)
    return parsed


def _name(name: object) -> str:
    if not isinstance(name, str) or (name and not _NAME.fullmatch(name)):
        reason = "use up to 128 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
        raise SandboxConfigError("name", name, reason)
    return name
