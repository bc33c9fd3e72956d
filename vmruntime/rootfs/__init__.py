"""Per-layer read-only filesystem images (EROFS) built from OCI layer tars."""

from vmruntime.rootfs.erofs import ErofsStats, build_erofs_from_tar

__all__ = ["ErofsStats", "build_erofs_from_tar"]
