"""The guest kernel: Debian's cloud kernel, downloaded once and cut down to what we boot.

Who calls it: :func:`vmruntime.guest.assets.ensure_guest_assets` (and through it
``python -m vmruntime.guest prepare``, which ``scripts/setup.sh`` runs);
:mod:`vmruntime.guest.initramfs` reads the modules it keeps.

What it promises:

- :func:`ensure_kernel` returns a :class:`GuestKernel` whose ``vmlinuz`` and
  ``modules_dir`` are complete: the package is fetched with ``apt-get download``
  (never installed), unpacked with ``dpkg-deb -x`` into a temporary directory
  under the cache and renamed to ``<cache>/guest/kernel/<release>/`` only when
  everything is in place, under a lock, so concurrent callers download once and
  a failure leaves nothing behind;
- offline first: a cached kernel is used without asking apt, unless
  ``refresh=True``; when apt fails and something is cached, the cache wins;
- ``modules_dir`` holds only the modules in :data:`NEEDED_MODULES`, their
  dependencies, and a ``modules.dep`` that *we* write: the .deb ships none
  (``depmod`` makes it at install time, and this host has no kmod), so the
  dependencies are read from each module's ``.modinfo`` section. Soft
  dependencies that are not built into the kernel are folded in as hard ones,
  because busybox ``insmod`` knows nothing of softdeps;
- :func:`module_load_order` lists those modules so that each comes after
  everything it depends on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmruntime import _paths
from vmruntime._durable import fsync_dir
from vmruntime.errors import GuestAssetError

META_PACKAGE = "linux-image-cloud-amd64"
# What the agent needs at boot: the virtio transport and disks, its console port,
# the layer filesystems, overlayfs, and virtio-fs for host mounts. Order matters
# only as a tie-break: dependencies always come first.
NEEDED_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "erofs",
    "overlay",
    "fuse",
    "virtiofs",
)
# Modules loaded only when the kernel command line asks (``vmr.modules=<group>``):
# each costs tens of milliseconds of boot under TCG, wasted on sandboxes without shares.
ON_DEMAND_MODULES: dict[str, tuple[str, ...]] = {"virtiofs": ("fuse", "virtiofs")}
_APT_OPTS = ("-o", "APT::Sandbox::User=root") if os.geteuid() == 0 else ()
_APT_TIMEOUT = 600


@dataclass(frozen=True)
class GuestKernel:
    """A cached guest kernel and the modules the initramfs loads."""

    release: str
    vmlinuz: Path
    modules_dir: Path


def kernel_cache_dir(cache_root: Path | None = None) -> Path:
    """``<cache>/guest/kernel``: one complete directory per kernel release."""
    return _paths.cache_root(cache_root) / "guest" / "kernel"


def ensure_kernel(cache_root: Path | None = None, *, refresh: bool = False) -> GuestKernel:
    """The cached guest kernel; downloads it only when none is cached (or ``refresh``)."""
    root = _paths.cache_root(cache_root)
    base = kernel_cache_dir(root)
    cached = cached_kernel(root)
    if cached is not None and not refresh:
        return cached
    with _paths.cache_writing(root), _paths.cache_lock("guest-kernel", root):
        # Another process may have finished the download while we waited.
        cached = cached_kernel(root)
        if cached is not None and not refresh:
            return cached
        try:
            return _download(root, base, cached)
        except GuestAssetError:
            if cached is not None:
                return cached
            raise


def cached_kernel(cache_root: Path | None = None) -> GuestKernel | None:
    """The newest complete kernel in the cache, or None; never touches the network."""
    base = kernel_cache_dir(cache_root)
    if not base.is_dir():
        return None
    releases = [p.name for p in base.iterdir() if (p / "vmlinuz").is_file()]
    if not releases:
        return None
    release = max(releases, key=_version_key)
    return _kernel_at(base / release, release)


def module_load_order(kernel: GuestKernel) -> list[str]:
    """Module paths (relative to ``modules_dir``) so that each follows its dependencies."""
    deps = read_modules_dep(kernel.modules_dir / "modules.dep")
    return _topological(deps, deps)


def read_modules_dep(path: Path) -> dict[str, list[str]]:
    """``modules.dep`` as {module path: [dependency paths]}, in file order."""
    deps: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        module, _, rest = line.partition(":")
        deps[module.strip()] = rest.split()
    return deps


# --- download and unpack ----------------------------------------------------


def _download(root: Path, base: Path, cached: GuestKernel | None) -> GuestKernel:
    work = _paths.cache_temp("guest-kernel", root)
    work.mkdir()
    try:
        package = _real_package(work)
        release = package.removeprefix("linux-image-")
        if cached is not None and cached.release == release:
            return cached
        deb = _apt_download(package, work)
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(deb), str(tree)], "unpacking " + deb.name)
        staged = work / "staged"
        _stage(tree, release, staged, version=_deb_field(deb, "Version"))
        base.mkdir(parents=True, exist_ok=True)
        final = base / release
        os.replace(staged, final)
        fsync_dir(base)
        return _kernel_at(final, release)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _real_package(work: Path) -> str:
    """The versioned image package the meta package depends on right now."""
    meta = _apt_download(META_PACKAGE, work)
    depends = _deb_field(meta, "Depends")
    match = re.search(r"\b(linux-image-\d[\w.+-]*)", depends)
    if match is None:
        raise GuestAssetError("kernel", f"{META_PACKAGE} depends on no kernel image: {depends!r}")
    meta.unlink()
    return match.group(1)


def _apt_download(package: str, work: Path) -> Path:
    before = set(work.glob("*.deb"))
    _run(["apt-get", *_APT_OPTS, "download", package], f"apt-get download {package}", cwd=work)
    new = sorted(set(work.glob("*.deb")) - before)
    if len(new) != 1:
        raise GuestAssetError("kernel", f"apt-get download {package} produced {len(new)} files")
    return new[0]


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field], f"reading {field} of {deb.name}").strip()


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestAssetError("kernel", f"{what}: {exc}; {_HINT}") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise GuestAssetError("kernel", f"{what} failed (exit {proc.returncode}): {tail}; {_HINT}")
    return proc.stdout


_HINT = "run scripts/setup.sh with network access to download the guest kernel"


def _stage(tree: Path, release: str, staged: Path, version: str) -> None:
    """Copy vmlinuz and the needed modules from an unpacked .deb into ``staged``."""
    vmlinuz = tree / "boot" / f"vmlinuz-{release}"
    mod_root = _modules_root(tree, release)
    if not vmlinuz.is_file() or mod_root is None:
        raise GuestAssetError("kernel", f"the {release} package has no vmlinuz or modules")
    index = _ModuleIndex(mod_root)
    deps = index.closure(NEEDED_MODULES)
    modules = staged / "modules"
    for rel in deps:
        (modules / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mod_root / rel, modules / rel)
    _write_modules_dep(modules / "modules.dep", deps)
    shutil.copyfile(vmlinuz, staged / "vmlinuz")
    meta = {"package": f"linux-image-{release}", "version": version, "release": release}
    (staged / "package.json").write_text(json.dumps(meta, indent=1) + "\n")
    for path in [*staged.rglob("*"), staged]:
        if path.is_file():
            _fsync_file(path)


def _modules_root(tree: Path, release: str) -> Path | None:
    # Debian 12 ships /lib/modules; later releases move it under /usr (merged /usr).
    for candidate in (tree / "lib" / "modules" / release, tree / "usr/lib/modules" / release):
        if candidate.is_dir():
            return candidate
    return None


def _write_modules_dep(path: Path, deps: dict[str, list[str]]) -> None:
    # depmod's format: every transitive dependency, the one to load last listed first.
    order = _topological(deps, deps)
    lines = []
    for module in order:
        needed = _transitive(module, deps)
        ordered = [m for m in reversed(order) if m in needed]
        lines.append(f"{module}: {' '.join(ordered)}".rstrip())
    path.write_text("\n".join(lines) + "\n")


def _transitive(module: str, deps: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(deps[module])
    while stack:
        dep = stack.pop()
        if dep not in seen:
            seen.add(dep)
            stack.extend(deps.get(dep, []))
    return seen


def _topological(roots: Iterable[str], deps: dict[str, list[str]]) -> list[str]:
    """Depth-first: each module after its dependencies, ties in ``roots`` order."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(module: str, chain: tuple[str, ...]) -> None:
        if state.get(module) == "done":
            return
        if state.get(module) == "visiting":
            raise GuestAssetError("kernel", f"module dependency cycle: {' -> '.join(chain)}")
        state[module] = "visiting"
        for dep in deps.get(module, []):
            visit(dep, (*chain, dep))
        state[module] = "done"
        order.append(module)

    for root in roots:
        visit(root, (root,))
    return order


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _kernel_at(directory: Path, release: str) -> GuestKernel:
    return GuestKernel(release, directory / "vmlinuz", directory / "modules")


def _version_key(release: str) -> list[tuple[int, str]]:
    # "6.1.0-56-cloud-amd64" > "6.1.0-9-cloud-amd64": numbers compare as numbers.
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", release) if p]


# --- module metadata ----------------------------------------------------------


class _ModuleIndex:
    """Modules of one kernel tree, by name, with dependencies from their .modinfo."""

    def __init__(self, mod_root: Path) -> None:
        self.root = mod_root
        self.by_name: dict[str, str] = {}
        for path in sorted(mod_root.rglob("*.ko")):
            self.by_name[_module_name(path.name)] = str(path.relative_to(mod_root))
        self.builtin = _builtin_names(mod_root)

    def closure(self, names: Iterable[str]) -> dict[str, list[str]]:
        """{module path: [direct dependency paths]} for ``names`` and all they need."""
        deps: dict[str, list[str]] = {}
        pending = [self._path(name, needed_by=None) for name in names]
        while pending:
            rel = pending.pop(0)
            if rel in deps:
                continue
            info = read_modinfo(self.root / rel)
            wanted = [d for d in info.get("depends", [""])[0].split(",") if d]
            wanted += [s for s in _softdeps(info) if s not in self.builtin and s in self.by_name]
            deps[rel] = [self._path(d, needed_by=rel) for d in wanted]
            pending.extend(deps[rel])
        return deps

    def _path(self, name: str, needed_by: str | None) -> str:
        rel = self.by_name.get(_module_name(name))
        if rel is None:
            why = f" (needed by {needed_by})" if needed_by else ""
            raise GuestAssetError("kernel", f"module {name}{why} is not in the kernel package")
        return rel


def _module_name(name: str) -> str:
    return name.removesuffix(".ko").replace("-", "_")


def _softdeps(info: dict[str, list[str]]) -> list[str]:
    """Names in ``softdep=pre: a b post: c`` that must be loaded before the module."""
    names: list[str] = []
    for value in info.get("softdep", []):
        section = ""
        for word in value.split():
            if word.endswith(":"):
                section = word[:-1]
            elif section == "pre":
                names.append(_module_name(word))
    return names


def _builtin_names(mod_root: Path) -> set[str]:
    """Names and aliases of everything built into the kernel (softdeps resolve to these)."""
    names: set[str] = set()
    builtin = mod_root / "modules.builtin"
    if builtin.is_file():
        names |= {_module_name(Path(line).name) for line in builtin.read_text().split()}
    modinfo = mod_root / "modules.builtin.modinfo"
    if modinfo.is_file():
        for entry in modinfo.read_bytes().split(b"\0"):
            key, _, value = entry.decode(errors="replace").partition("=")
            if key.endswith(".alias"):
                names.add(_module_name(value))
    return names


def read_modinfo(path: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02" or data[5] != 1:
        raise GuestAssetError("kernel", f"{path.name} is not a little-endian ELF64 module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = []
    for i in range(shnum):
        name_off, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        sections.append((name_off, offset, size))
    strtab = sections[shstrndx][1]
    info: dict[str, list[str]] = {}
    for name_off, offset, size in sections:
        end = data.index(b"\0", strtab + name_off)
        if data[strtab + name_off : end] != b".modinfo":
            continue
        for entry in data[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info
