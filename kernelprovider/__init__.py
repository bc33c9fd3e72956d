"""Jupyter kernel provisioner that runs kernels in vmruntime sandboxes (a later issue)."""
