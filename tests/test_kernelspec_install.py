"""The kernelspec installer (``python -m kernelprovider install | list | remove``).

Fast tier: no VM. Specs go into a temporary prefix, which Jupyter is told about with
``JUPYTER_PATH``, and are read back with jupyter_client's own ``KernelSpecManager``;
the image they name is a tiny one loaded into the test's private cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from imagefactory import directory, file, make_layer_tar, write_oci_layout
from jupyter_client.kernelspec import KernelSpecManager

from kernelprovider.install import (
    DEFAULT_ARGV,
    InstallScope,
    KernelOptions,
    KernelSpecError,
    install,
    list_specs,
    remove,
    sandboxed_display_name,
)
from vmruntime import images
from vmruntime._ext4 import make_ext4
from vmruntime.errors import MountError, VolumeNotFoundError
from vmruntime.volumes.store import VolumeStore

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "example/tiny:1"


@pytest.fixture
def image(store: images.ImageStore, tmp_path: Path) -> str:
    """A one-layer image in the test's own cache (``store`` points VMRUNTIME_CACHE at it)."""
    layer = make_layer_tar([directory("etc"), file("etc/hostname", "tiny\n")])
    write_oci_layout(tmp_path / "layout", [layer])
    images.load(tmp_path / "layout", IMAGE, store=store)
    return IMAGE


@pytest.fixture
def prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An install prefix that Jupyter searches first, as a virtualenv's would be."""
    root = tmp_path / "prefix"
    monkeypatch.setenv("JUPYTER_PATH", str(root / "share" / "jupyter"))
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "state"))  # volumes live here
    (tmp_path / "home").mkdir(exist_ok=True)  # the `store` fixture's HOME; IPython writes there
    return root


def kernels_dir(prefix: Path) -> Path:
    return prefix / "share" / "jupyter" / "kernels"


def read_back(name: str) -> dict:
    """The spec as Jupyter reads it (the provisioner entry point must be registered)."""
    return KernelSpecManager().get_kernel_spec(name).to_dict()


def config_of(spec: dict) -> dict:
    return spec["metadata"]["kernel_provisioner"]["config"]


def test_an_installed_spec_reads_back_through_jupyter(image, prefix, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    disk = tmp_path / "scratch.ext4"
    make_ext4(disk, 16 << 20, journal=False)
    VolumeStore().create("notes")
    options = KernelOptions(
        image=image, display_name="Data science", cpus=2, memory_mib=768,
        mounts=[f"{data}:/data:ro"], volumes=["notes:/notes"], disks=[f"{disk}:/scratch"],
        share_notebook_dir="rw", pass_env=["API_TOKEN"], env={"MODE": "test"},
        startup_timeout=90, rotate_key_on_restart=False,
    )  # fmt: skip

    result = install("Demo", options, InstallScope(prefix=prefix))

    assert result.installed.resource_dir == kernels_dir(prefix) / "demo"  # as Jupyter, lowered
    assert result.visible and result.shadowed_by is None
    spec = read_back("demo")
    assert spec["argv"] == list(DEFAULT_ARGV)
    assert spec["display_name"] == f"Data science (sandboxed: {image})"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "signal"
    assert spec["env"] == {"MODE": "test"}
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "microvm-provisioner"
    assert spec["metadata"]["debugger"] is False
    assert config_of(spec) == {
        "image": image, "cpus": 2, "memory": 768, "mounts": [f"{data}:/data:ro"],
        "volumes": ["notes:/notes"], "disks": [f"{disk}:/scratch"],
        "share_notebook_dir": "rw", "startup_timeout": 90.0, "pass_env": ["API_TOKEN"],
        "rotate_key_on_restart": False,
    }  # fmt: skip
    assert (result.installed.resource_dir / "logo-64x64.png").stat().st_size > 0


def test_relative_host_paths_are_written_absolute(image, prefix, tmp_path, monkeypatch) -> None:
    """The server that reads the spec has another working directory."""
    (tmp_path / "rel").mkdir()
    monkeypatch.chdir(tmp_path)
    install("rel", KernelOptions(image=image, mounts=["rel:/rel"]), InstallScope(prefix=prefix))
    assert config_of(read_back("rel"))["mounts"] == [f"{tmp_path}/rel:/rel"]


def test_the_display_name_always_says_sandboxed_and_which_image() -> None:
    image = "vmruntime/default:latest"
    assert sandboxed_display_name(None, image) == f"Python 3 (sandboxed: {image})"
    assert sandboxed_display_name("  ", image) == f"Python 3 (sandboxed: {image})"
    assert sandboxed_display_name("Stats", image) == f"Stats (sandboxed: {image})"
    # Saying one of the two is not enough.
    assert sandboxed_display_name("Sandboxed Python", image).endswith(f"(sandboxed: {image})")
    assert sandboxed_display_name(f"Python on {image}", image).endswith(f"(sandboxed: {image})")
    kept = f"Sandbox: {image}, big memory"
    assert sandboxed_display_name(kept, image) == kept


def test_an_existing_spec_is_replaced_only_when_asked(image, prefix) -> None:
    scope = InstallScope(prefix=prefix)
    install("demo", KernelOptions(image=image, cpus=1), scope)

    with pytest.raises(KernelSpecError, match="--replace") as refused:
        install("demo", KernelOptions(image=image, cpus=3), scope)
    assert refused.value.name == "demo"
    assert config_of(read_back("demo"))["cpus"] == 1

    install("demo", KernelOptions(image=image, cpus=3), scope, replace=True)
    assert config_of(read_back("demo"))["cpus"] == 3


def test_a_missing_image_is_refused_with_how_to_get_it(image, prefix) -> None:
    scope = InstallScope(prefix=prefix)
    with pytest.raises(KernelSpecError, match=r"`vmr image pull example/absent:2`"):
        install("absent", KernelOptions(image="example/absent:2"), scope)
    # The default image is never pulled: it is built here. This cache does not hold it.
    with pytest.raises(KernelSpecError, match=r"`vmr image build-default`"):
        install("default", KernelOptions(), scope)
    assert not kernels_dir(prefix).exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"mounts": ["no-colon"]}, "no-colon"),
        ({"mounts": ["/srv:relative/guest"]}, "relative/guest"),
        ({"mounts": ["/tmp:/proc/x"]}, "/proc/x"),
        ({"mounts": ["/does/not/exist:/data"]}, "/does/not/exist"),
        ({"mounts": ["/tmp:/data", "/var:/data"]}, "/data"),
        ({"disks": ["/etc/hostname:/disk"]}, "/etc/hostname"),  # a file, not ext4
    ],
)
def test_a_bad_mount_is_refused_naming_it(image, prefix, options, named) -> None:
    with pytest.raises(MountError) as refused:
        install("bad", KernelOptions(image=image, **options), InstallScope(prefix=prefix))
    assert named in str(refused.value)
    assert not kernels_dir(prefix).exists()


def test_an_unknown_volume_or_bad_setting_is_refused(image, prefix) -> None:
    scope = InstallScope(prefix=prefix)
    with pytest.raises(VolumeNotFoundError, match="nowhere"):
        install("bad", KernelOptions(image=image, volumes=["nowhere:/v"]), scope)
    with pytest.raises(KernelSpecError, match="'A-B'"):
        install("bad", KernelOptions(image=image, pass_env=["A-B"]), scope)
    with pytest.raises(KernelSpecError, match="letters, digits"):
        install("bad name", KernelOptions(image=image), scope)
    with pytest.raises(ValueError, match="cpus"):
        install("bad", KernelOptions(image=image, cpus=0), scope)
    assert not kernels_dir(prefix).exists()


def write_plain_spec(prefix: Path, name: str) -> Path:
    """A kernelspec that is not ours: the host's ipykernel."""
    path = kernels_dir(prefix) / name
    path.mkdir(parents=True)
    spec = {"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (host)", "language": "python"}  # fmt: skip
    (path / "kernel.json").write_text(json.dumps(spec))
    return path


def test_list_shows_only_sandboxed_specs(image, prefix) -> None:
    scope = InstallScope(prefix=prefix)
    install("beta", KernelOptions(image=image), scope)
    install("alpha", KernelOptions(image=image, display_name="A"), scope)
    write_plain_spec(prefix, "host")

    ours = [s for s in list_specs() if s.resource_dir.parent == kernels_dir(prefix)]

    assert [(s.name, s.image, s.display_name) for s in ours] == [
        ("alpha", image, f"A (sandboxed: {image})"),
        ("beta", image, f"Python 3 (sandboxed: {image})"),
    ]


def test_remove_deletes_only_sandboxed_specs(image, prefix) -> None:
    install("demo", KernelOptions(image=image), InstallScope(prefix=prefix))
    host = write_plain_spec(prefix, "host")

    assert remove("demo") == kernels_dir(prefix) / "demo"
    assert not (kernels_dir(prefix) / "demo").exists()
    with pytest.raises(KernelSpecError, match="jupyter kernelspec remove host"):
        remove("host")
    assert (host / "kernel.json").exists()
    with pytest.raises(KernelSpecError, match="no such kernelspec"):
        remove("demo")


def test_the_default_scope_is_the_virtualenv_else_the_user() -> None:
    assert InstallScope.for_prefixes("/venv", "/usr") == InstallScope(prefix=Path("/venv"))
    assert InstallScope.for_prefixes("/usr", "/usr") == InstallScope(user=True)
    with pytest.raises(ValueError):
        InstallScope(user=True, prefix=Path("/venv"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kernelprovider", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_command_line_installs_lists_and_removes(image, prefix, tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    install_args = ["install", "--name", "cli", "--image", image, "--prefix", str(prefix),
                    "--mount", f"{shared}:/shared:ro", "--share-notebook-dir", "--env", "TOKEN",
                    "--memory", "640"]  # fmt: skip

    done = cli(*install_args)
    assert done.returncode == 0, done.stderr
    assert str(kernels_dir(prefix) / "cli") in done.stdout
    config = config_of(read_back("cli"))
    assert config["share_notebook_dir"] == "ro"  # the flag alone means read-only
    assert config["mounts"] == [f"{shared}:/shared:ro"]
    assert (config["pass_env"], config["memory"]) == (["TOKEN"], 640)
    assert config["rotate_key_on_restart"] is True
    kept = cli("install", "--name", "kept", "--image", image, "--prefix", str(prefix),
               "--keep-key-on-restart")  # fmt: skip
    assert kept.returncode == 0, kept.stderr
    assert config_of(read_back("kept"))["rotate_key_on_restart"] is False

    again = cli(*install_args)
    assert again.returncode == 1
    assert "exists; pass --replace" in again.stderr
    assert cli(*install_args, "--replace").returncode == 0

    bad = cli("install", "--name", "x", "--image", image, "--prefix", str(prefix),
              "--mount", "no-colon")  # fmt: skip
    assert bad.returncode == 1
    assert "no-colon" in bad.stderr and "Traceback" not in bad.stderr

    listed = cli("list")
    assert listed.returncode == 0
    row = next(line.split() for line in listed.stdout.splitlines() if line.split()[:1] == ["cli"])
    assert row[1] == image
    as_json = json.loads(cli("list", "--json").stdout)["kernelspecs"]
    assert config_of(as_json["cli"]["spec"]) == config

    removed = cli("remove", "cli")
    assert removed.returncode == 0, removed.stderr
    assert not (kernels_dir(prefix) / "cli").exists()
    assert cli("remove", "cli").returncode == 1
