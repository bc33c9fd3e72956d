"""Kernelspecs for sandboxed kernels: build, install, list and remove them.

Who calls it: ``python -m kernelprovider install | list | remove`` (``__main__.py``),
``scripts/run.sh`` and tests. The provisioner (``provisioner.py``) reads what this
writes: ``metadata.kernel_provisioner.config`` of ``kernel.json``
(docs/jupyter.md, "Installing a sandboxed kernel").

What it promises:

- :func:`build_kernel_spec` makes the ``kernel.json`` document from
  :class:`KernelOptions` after every check that needs no disk (ranges, the image
  reference's syntax, mount specs and guest paths, variable names); host paths
  become absolute, because the server that reads the spec runs somewhere else;
- :func:`install` also checks the disk first: the image is in the local cache, every
  host folder, disk image and volume exists; it refuses to overwrite a kernelspec
  unless asked to, and writes through jupyter_client's ``KernelSpecManager``;
- :func:`list_specs` and :func:`remove` see only sandboxed kernelspecs (those naming
  ``microvm-provisioner``), where Jupyter would find them; ``remove`` refuses any
  other kernelspec rather than delete it;
- every refusal is a :class:`KernelSpecError` (or the runtime's own ``MountError``,
  ``SandboxConfigError``, ``VolumeNotFoundError``, ``InvalidReferenceError``) naming
  the offending value.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

from kernelprovider.defaults import DEFAULT_IMAGE, DEFAULT_MEMORY_MIB, DEFAULT_STARTUP_TIMEOUT
from vmruntime.errors import ImageNotFoundError, VmruntimeError
from vmruntime.images import resolve as resolve_cached_image
from vmruntime.images.reference import local_only_hint
from vmruntime.vm import Mount, SandboxConfig
from vmruntime.vm.mounts import MountKind, resolve_mounts

PROVISIONER_NAME = "microvm-provisioner"
DEFAULT_ARGV = ("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}")
ShareMode = Literal["off", "ro", "rw"]
_SHARE_MODES = ("off", "ro", "rw")
# jupyter_client lower-cases names and accepts only these (kernelspec._is_valid_kernel_name).
_KERNEL_NAME = re.compile(r"[a-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


class KernelSpecError(VmruntimeError, ValueError):
    """A kernelspec that cannot be built, installed, found or removed; ``name`` is the
    spec's ("" while its options are checked, before it has one)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"kernelspec {name!r}: {reason}" if name else f"kernelspec: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class KernelOptions:
    """What a sandboxed kernel runs in: the provisioner's config, plus its display name.

    Mounts, volumes and disks are the strings ``vmr run --mount/--volume/--disk``
    takes. ``pass_env`` names server variables passed into the guest; ``env`` is
    written into the kernelspec itself (readable by anyone who can read it).
    """

    image: str = DEFAULT_IMAGE
    display_name: str | None = None
    cpus: int = 1
    memory_mib: int = DEFAULT_MEMORY_MIB
    mounts: Sequence[str] = ()
    volumes: Sequence[str] = ()
    disks: Sequence[str] = ()
    share_notebook_dir: ShareMode = "off"
    pass_env: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    rotate_key_on_restart: bool = True


@dataclass(frozen=True)
class InstallScope:
    """Where a kernelspec goes: the user's Jupyter data dir, or ``PREFIX/share/jupyter``."""

    user: bool = False
    prefix: Path | None = None

    def __post_init__(self) -> None:
        if self.user == (self.prefix is not None):
            raise ValueError("an install scope is either the user's or a prefix, not both")

    @classmethod
    def default(cls) -> InstallScope:
        """The virtualenv's prefix when running in one (its Jupyter finds it, and removing
        the virtualenv removes the kernel too), else the user's data dir; never the
        system's, which would need root."""
        return cls.for_prefixes(sys.prefix, sys.base_prefix)

    @classmethod
    def for_prefixes(cls, prefix: str, base_prefix: str) -> InstallScope:
        return cls(prefix=Path(prefix)) if prefix != base_prefix else cls(user=True)

    def kernels_dir(self) -> Path:
        """The directory holding the kernelspecs, as jupyter_client computes it."""
        if self.user:
            return Path(KernelSpecManager().user_kernel_dir)
        assert self.prefix is not None
        return self.prefix.absolute() / "share" / "jupyter" / "kernels"

    def describe(self) -> str:
        return "--user" if self.user else f"--prefix {self.prefix}"


@dataclass(frozen=True)
class InstalledSpec:
    """A sandboxed kernelspec on disk: its name, directory and ``kernel.json``."""

    name: str
    resource_dir: Path
    spec: Mapping[str, Any]

    @property
    def display_name(self) -> str:
        return str(self.spec.get("display_name", ""))

    @property
    def config(self) -> Mapping[str, Any]:
        return provisioner_config(self.spec)

    @property
    def image(self) -> str:
        return str(self.config.get("image", DEFAULT_IMAGE))


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did, and what the caller may want to warn about."""

    installed: InstalledSpec
    # Jupyter looks here for kernelspecs (False: only found with JUPYTER_PATH set).
    visible: bool
    # A kernelspec of the same name that Jupyter finds first, hiding this one.
    shadowed_by: Path | None


# --- building ---------------------------------------------------------------


def build_kernel_spec(options: KernelOptions) -> dict[str, Any]:
    """The ``kernel.json`` document for ``options``, checked but without touching the disk."""
    mounts = _parsed_mounts(options)
    # The runtime's own checks: ranges, the reference's syntax, guest paths (none twice).
    SandboxConfig(options.image, cpus=options.cpus, memory_mib=options.memory_mib, mounts=mounts)
    share = _share_mode(options.share_notebook_dir)
    config = {
        "image": options.image,
        "cpus": options.cpus,
        "memory": options.memory_mib,
        "mounts": [m.spec for m in mounts if m.kind == "bind"],
        "volumes": [m.spec for m in mounts if m.kind == "volume"],
        "disks": [m.spec for m in mounts if m.kind == "disk"],
        "share_notebook_dir": share,
        "startup_timeout": _startup_timeout(options.startup_timeout),
        "pass_env": [_env_name(name) for name in options.pass_env],
        "rotate_key_on_restart": bool(options.rotate_key_on_restart),
    }
    return {
        "argv": list(DEFAULT_ARGV),
        "display_name": sandboxed_display_name(options.display_name, options.image),
        "language": "python",
        "interrupt_mode": "signal",
        "env": {_env_name(name): str(value) for name, value in options.env.items()},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
        },
    }


def sandboxed_display_name(text: str | None, image: str) -> str:
    """``text``, made to say that the kernel is sandboxed and in which image.

    No text gives ``Python 3 (sandboxed: IMAGE)``. A text that already says both (the
    word "sandbox" in any case, and the image reference as given) is kept as it is;
    any other gets `` (sandboxed: IMAGE)`` appended, so a launcher never shows a
    sandboxed kernel that looks like the host's.
    """
    suffix = f"(sandboxed: {image})"
    text = (text or "").strip()
    if not text:
        return f"Python 3 {suffix}"
    if "sandbox" in text.lower() and image in text:
        return text
    return f"{text} {suffix}"


def _parsed_mounts(options: KernelOptions) -> list[Mount]:
    kinds: tuple[tuple[MountKind, Sequence[str]], ...] = (
        ("bind", options.mounts), ("volume", options.volumes), ("disk", options.disks),
    )  # fmt: skip
    parsed = []
    for kind, specs in kinds:
        for spec in specs:
            mount = Mount.parse(spec, kind)
            if kind != "volume":  # the server reading the spec has its own working directory
                mount = Mount(Path(mount.host).expanduser().absolute(), mount.guest,
                              mount.readonly, kind)  # fmt: skip
            parsed.append(mount)
    return parsed


def _share_mode(value: str) -> ShareMode:
    if value not in _SHARE_MODES:
        raise KernelSpecError("", f"share_notebook_dir={value!r}: want one of {_SHARE_MODES}")
    return value  # type: ignore[return-value]  # checked just above


def _startup_timeout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise KernelSpecError("", f"startup_timeout={value!r}: want a positive number of seconds")
    return float(value)


def _env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise KernelSpecError("", f"environment variable name {name!r} is not a valid name")
    return name


# --- checks that need the disk ----------------------------------------------


def check_host(options: KernelOptions, name: str = "") -> None:
    """The image is in the local cache; every host folder, disk image and volume exists."""
    check_image_is_cached(options.image, name)
    resolve_mounts(_parsed_mounts(options))


def check_image_is_cached(image: str, name: str = "") -> None:
    """Reads the cache only (no layer image is built): installing stays quick."""
    try:
        resolve_cached_image(image)
    except ImageNotFoundError:
        raise KernelSpecError(name, f"image {image!r} is not in the local cache; "
                              f"{_how_to_get(image)}") from None  # fmt: skip


def _how_to_get(image: str) -> str:
    from vmruntime.images import parse_reference

    command = local_only_hint(parse_reference(image))
    if command is not None:  # the default image is built here, never pulled
        return f"build it with `{command}`"
    return f"fetch it with `vmr image pull {image}` (or `vmr image load PATH --tag {image}`)"


# --- installing, listing, removing -----------------------------------------


def install(name: str, options: KernelOptions, scope: InstallScope | None = None,
            replace: bool = False) -> InstallResult:  # fmt: skip
    """Check ``options``, then write the kernelspec ``name`` into ``scope`` (default:
    :meth:`InstallScope.default`). An existing one is replaced only with ``replace``."""
    name = _kernel_name(name)
    scope = scope or InstallScope.default()
    spec = build_kernel_spec(options)
    check_host(options, name)
    destination = scope.kernels_dir() / name
    if destination.exists() and not replace:
        raise KernelSpecError(name, f"{destination} exists; pass --replace to overwrite it")
    manager = KernelSpecManager()
    with tempfile.TemporaryDirectory(prefix="kernelspec-") as staging:
        source = Path(staging) / name
        source.mkdir()
        (source / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        _copy_logos(source)
        written = manager.install_kernel_spec(
            str(source), name, user=scope.user,
            prefix=None if scope.prefix is None else str(scope.prefix.absolute()),
        )  # fmt: skip
    installed = InstalledSpec(name, Path(written), spec)
    kernel_dirs = [Path(d) for d in manager.kernel_dirs]
    found_first = _find_spec_dirs(manager).get(name)
    shadowed_by = found_first if found_first not in (None, Path(written)) else None
    return InstallResult(installed, Path(written).parent in kernel_dirs, shadowed_by)


def list_specs(manager: KernelSpecManager | None = None) -> list[InstalledSpec]:
    """The sandboxed kernelspecs Jupyter finds (the first of each name), sorted by name."""
    manager = manager or KernelSpecManager()
    found = []
    for name, resource_dir in sorted(_find_spec_dirs(manager).items()):
        spec = _read_spec(resource_dir)
        if spec is not None and is_sandboxed(spec):
            found.append(InstalledSpec(name, resource_dir, spec))
    return found


def remove(name: str, manager: KernelSpecManager | None = None) -> Path:
    """Delete the sandboxed kernelspec ``name`` that Jupyter finds first; its directory.

    A kernelspec of that name that is not sandboxed is left alone (that is
    ``jupyter kernelspec remove``'s job).
    """
    manager = manager or KernelSpecManager()
    resource_dir = _find_spec_dirs(manager).get(name.lower())
    if resource_dir is None:
        raise KernelSpecError(name, "no such kernelspec (see `python -m kernelprovider list`)")
    spec = _read_spec(resource_dir)
    if spec is None or not is_sandboxed(spec):
        raise KernelSpecError(name, f"{resource_dir} is not a sandboxed kernel; remove it with "
                              f"`jupyter kernelspec remove {name}`")  # fmt: skip
    if resource_dir.is_symlink():
        resource_dir.unlink()
    else:
        shutil.rmtree(resource_dir)
    return resource_dir


def provisioner_config(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """``metadata.kernel_provisioner.config`` of a ``kernel.json`` document (or ``{}``)."""
    provisioner = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
    return provisioner.get("config") or {}


def is_sandboxed(spec: Mapping[str, Any]) -> bool:
    provisioner = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
    return provisioner.get("provisioner_name") == PROVISIONER_NAME


def _kernel_name(name: str) -> str:
    lowered = name.lower()
    if not _KERNEL_NAME.fullmatch(lowered):
        raise KernelSpecError(name, "a kernel name holds only letters, digits, '.', '_' and '-'")
    return lowered


def _find_spec_dirs(manager: KernelSpecManager) -> dict[str, Path]:
    # find_kernel_specs, not get_all_specs: the latter drops (with a warning) specs whose
    # provisioner is not importable, and a listing should still show them.
    native = manager.ensure_native_kernel
    manager.ensure_native_kernel = False  # ipykernel's built-in spec is never ours
    try:
        return {name: Path(path) for name, path in manager.find_kernel_specs().items()}
    finally:
        manager.ensure_native_kernel = native


def _read_spec(resource_dir: Path) -> dict[str, Any] | None:
    try:
        return KernelSpec.from_resource_dir(str(resource_dir)).to_dict()
    except (OSError, ValueError):  # unreadable or not JSON: not one we can describe
        return None


def _copy_logos(destination: Path) -> None:
    """ipykernel's logos, so the launcher shows the Python icon; skipped if not found."""
    found = importlib.util.find_spec("ipykernel")
    for location in (found.submodule_search_locations or []) if found else []:
        resources = Path(location) / "resources"
        for logo in _LOGOS:
            if (resources / logo).is_file():
                shutil.copyfile(resources / logo, destination / logo)
