"""The public API re-exported from the packages resolves to real objects."""


def test_public_api_lists_only_names_that_exist() -> None:
    import vmruntime
    import vmruntime.images

    for module in (vmruntime, vmruntime.images):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    assert set(vmruntime.images.__all__) >= set(vmruntime.images._EXPORTS)
