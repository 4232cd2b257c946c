"""deploy/docker/wheelhouse.py: the wheels an image build with no package index needs, for any 3.11.* release."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "deploy" / "docker" / "wheelhouse.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(directory: Path, name: str, version: str, *requires: str) -> None:
    dist = f"{name}-{version}"
    with zipfile.ZipFile(directory / f"{dist}-py3-none-any.whl", "w") as archive:
        metadata = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}"]
        metadata += [f"Requires-Dist: {r}" for r in requires]
        archive.writestr(f"{dist}.dist-info/METADATA", "\n".join(metadata) + "\n")


def test_requirements_other_patch_releases_need_are_found(tmp_path: Path) -> None:
    wheelhouse = _module()
    _wheel(tmp_path, "redis", "5.2.1", 'async-timeout>=4.0.3; python_full_version < "3.11.3"',
           'cryptography>=36; extra == "ocsp"', 'pywin32; sys_platform == "win32"')
    # Redis needs async-timeout below 3.11.3 (Debian bookworm has 3.11.2); extras and other platforms are not wanted.
    assert wheelhouse.missing_for_other_patches(tmp_path) == (
        ["async-timeout>=4.0.3"] if sys.version_info[:2] == (3, 11) else [])
    _wheel(tmp_path, "async_timeout", "4.0.3")
    assert wheelhouse.missing_for_other_patches(tmp_path) == []


def test_a_cuda_torch_is_recognised(tmp_path: Path) -> None:
    wheelhouse = _module()
    for name in ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", "numpy-2.0.0-py3-none-any.whl"):
        (tmp_path / name).touch()
    assert wheelhouse.cuda_wheels(tmp_path) == []
    for name in ("torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", "nvidia_cublas_cu12-12.8-py3-none-any.whl"):
        (tmp_path / name).touch()
    assert wheelhouse.cuda_wheels(tmp_path) == ["nvidia_cublas_cu12-12.8-py3-none-any.whl",
                                                "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"]
