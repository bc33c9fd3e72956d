"""What a sandboxed kernel gets when its kernelspec does not say: shared by the
provisioner (which applies them) and the installer (which writes them out)."""

DEFAULT_IMAGE = "vmruntime/default:latest"  # the short name users know (a local alias)
DEFAULT_CPUS = 1
DEFAULT_MEMORY_MIB = 1024  # ipykernel + pandas + matplotlib in the guest want more than 512
DEFAULT_STARTUP_TIMEOUT = 120.0  # boot + `import ipykernel` (7.6 s) under TCG, with room
