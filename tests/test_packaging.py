"""What the wheel installs: store/ and integrations/ inside the icmem namespace (never as bare
packages), the data files, and the shipped ICAE checkpoint intact."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_imports_namespaced_packages():
    code = (
        "import icmem, icmem.store, icmem.integrations, icmem.integrations.langchain, sys;"
        "import importlib.util as u;"
        "sys.exit(0 if u.find_spec('store') is None and u.find_spec('integrations') is None else 3)"
    )
    # Run from a neutral directory so the repository root is not on sys.path.
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_store_import_does_not_pull_in_torch():
    code = "import sys, icmem.store; sys.exit(1 if 'torch' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    """The project's wheel, built once for every test that looks inside it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
    )
    (path,) = out.glob("icmem-*.whl")
    with zipfile.ZipFile(path) as opened:
        yield opened


def test_wheel_has_no_top_level_store_or_integrations(wheel):
    names = wheel.namelist()
    top = {name.split("/")[0] for name in names}
    assert "store" not in top and "integrations" not in top
    assert "icmem/store/__init__.py" in names
    assert "icmem/integrations/langchain/__init__.py" in names
    assert "icmem/cli/__main__.py" in names  # `python -m icmem.cli`, as the campaign runs it
    assert any(name.startswith("icmem/data/") for name in names)


def test_wheel_ships_the_default_checkpoint_intact(wheel):
    """`ICAE.from_pretrained()` with no arguments reads the checkpoint inside the installed
    package, so a wheel without it (or with a file that no longer matches the manifest's
    SHA-256) passes every test run from the source tree and breaks `make demo` once installed.
    """
    from icmem.icae.checkpoint import DEFAULT_CHECKPOINT

    folder = DEFAULT_CHECKPOINT.relative_to(ROOT).as_posix()
    assert folder == "icmem/checkpoints/smollm2-135m-instruct-k128"
    names = set(wheel.namelist())
    for name in (
        "icae_config.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "icae_embeddings.safetensors",
    ):
        assert f"{folder}/{name}" in names, f"{folder}/{name} is missing from the wheel"
    manifest = json.loads(wheel.read(f"{folder}/icae_config.json"))
    recorded = manifest["files"]
    expected = {"adapter_model.safetensors", "icae_embeddings.safetensors"}
    if manifest["config"].get("decoder_lora_rank"):
        expected.add("decoder_adapter.safetensors")
    assert set(recorded) == expected
    for name, digest in recorded.items():
        assert hashlib.sha256(wheel.read(f"{folder}/{name}")).hexdigest() == digest, name


def test_console_script_is_installed():
    assert importlib.util.find_spec("icmem.cli") is not None
    out = subprocess.run(
        [Path(sys.executable).parent / "icmem", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "chunk" in out and "demo" in out
