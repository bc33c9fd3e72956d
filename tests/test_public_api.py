"""The public API re-exported from the packages resolves to real objects."""


def test_public_api_lists_only_names_that_exist() -> None:
    import vmruntime
    import vmruntime.images

    for module in (vmruntime, vmruntime.images):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    # functions named like their modules must stay functions, whatever was imported first
    import vmruntime.images.load
    import vmruntime.images.pull

    assert callable(vmruntime.images.pull) and callable(vmruntime.images.load)
    assert callable(vmruntime.pull) and callable(vmruntime.load)


def test_importing_the_runtime_does_not_load_the_http_stack() -> None:
    import subprocess
    import sys

    probe = "import sys, vmruntime.rootfs.unpack, vmruntime.vm; print('requests' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
