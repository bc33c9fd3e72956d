"""Per-layer read-only filesystem images (EROFS) built from OCI layer tars."""
