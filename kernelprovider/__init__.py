"""The Jupyter front door: kernels that each run in their own microVM.

- :mod:`kernelprovider.provisioner`: ``MicroVMProvisioner``, the jupyter_client kernel
  provisioner registered as ``microvm-provisioner``;
- :mod:`kernelprovider.kernel`: one kernel's sandbox (the VM, the kernel process, its
  port forwards);
- :mod:`kernelprovider.install`: kernelspecs that name the provisioner
  (``python -m kernelprovider install | list | remove``);
- :mod:`kernelprovider.execute`: running a notebook on such a kernel
  (``python -m kernelprovider execute``).

Nothing is imported here, so ``python -m kernelprovider list`` stays quick. Details:
docs/jupyter.md.
"""
