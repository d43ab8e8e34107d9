"""store/ and integrations/ install inside the icmem namespace, never as bare packages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

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


def test_wheel_has_no_top_level_store_or_integrations(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("icmem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert "store" not in top and "integrations" not in top
    assert "icmem/store/__init__.py" in names
    assert "icmem/integrations/langchain/__init__.py" in names
    assert any(name.startswith("icmem/data/") for name in names)


def test_console_script_is_installed():
    assert importlib.util.find_spec("icmem.cli") is not None
    out = subprocess.run(
        [Path(sys.executable).parent / "icmem", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "chunk" in out and "demo" in out
