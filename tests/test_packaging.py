"""Packaging: what a wheel of lora2 installs, and the import name it must not take.

Triton's own kernel library and a PyPI package are both imported as ``triton_kernels``; lora2's
top-level folder of that name must install only as ``lora2_kernels.triton_kernels``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from this checkout, against the installed torch (no build isolation)."""
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                          "-w", str(out), str(ROOT)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    (path,) = out.glob("lora2-*.whl")
    return path


def test_the_wheel_ships_the_kernels_under_lora2_kernels_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lora2_kernels/triton_kernels/lora_linear.py" in names
    assert "lora2_kernels/triton_kernels/compile_all.py" in names
    assert any(n.startswith("lora2_kernels/_C") and n.endswith(".so") for n in names)
    assert "lora2/datasets/sst2/train.tsv" in names
    assert not any(n.startswith("triton_kernels/") for n in names)
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lora2", "lora2_kernels"}


def test_installed_in_a_clean_venv_triton_kernels_is_not_ours(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # torch & co. from this interpreter's site-packages (a venv's too, which system_site_packages
    # would miss), listed by a plain .pth: its paths come after the new venv's own site-packages,
    # and the .pth files inside them (the editable install of this checkout) are not processed.
    parents = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "_lora2_test_parent_env.pth").write_text("\n".join(parents) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              str(wheel)], capture_output=True, text=True, check=False)
    if install.returncode != 0 and "no such option: --python" in install.stderr:  # pip < 22.3
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                                  str(env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                                      / "site-packages"), str(wheel)], capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stderr[-4000:]
    probe = (
        "import importlib.util, json, lora2_kernels, lora2_kernels.triton_kernels as k\n"
        "spec = importlib.util.find_spec('triton_kernels')\n"
        "print(json.dumps({'kernels': k.__file__, 'package': lora2_kernels.__file__,\n"
        "                  'triton_kernels': spec.origin if spec else None,\n"
        "                  'cpu_op': lora2_kernels.available_backends()['importance_cpu']}))\n")
    # A clean environment: nothing inherited that points at this checkout (PYTHONPATH would import the
    # tree's copy and the test would prove nothing about the wheel).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                         check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    import json

    found = json.loads(run.stdout)
    assert str(env_dir) in found["kernels"] and str(env_dir) in found["package"]  # the wheel's copy, not the tree's
    assert found["triton_kernels"] is None or not found["triton_kernels"].startswith(str(ROOT))
    assert found["cpu_op"] is True


def test_from_a_source_checkout_the_folder_refuses_the_top_level_name():
    """Run from the repository root, the folder is on sys.path; importing it as triton_kernels fails
    with a message, so libraries probing for Triton's package are not handed lora2's."""
    run = subprocess.run([sys.executable, "-c", "import triton_kernels"], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert run.returncode != 0
    assert "import it as lora2_kernels.triton_kernels" in run.stderr
