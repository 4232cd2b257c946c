"""Fill a wheelhouse for building the router image with no package index (``make wheelhouse``).

``pip wheel`` resolves the router's dependencies (with PyTorch's CPU index beside the usual ones, so torch is the
CPU build the image needs, and setuptools for the image's own build) for the interpreter running it; a CUDA torch
in the result is refused. Requirements that an environment marker switches on only for
other patch releases of the same Python (redis needs async-timeout below 3.11.3, and Debian bookworm ships 3.11.2)
would be missing, so the wheels' metadata is read back and those are added too: the wheelhouse serves any
CPython 3.X.* on this platform, whichever patch release the image's base carries.

    python deploy/docker/wheelhouse.py [--dir wheelhouse] [--torch-index URL]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
PATCH_RELEASES = range(0, 30)  # 3.X.0 to 3.X.29: every patch release a base image may carry


TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip_wheel(directory: Path, *requirements: str, index: str = "") -> None:
    """Wheels for ``requirements`` into ``directory``, preferring the ones already there (``--find-links``);
    ``index``: an extra package index for this call alone."""
    extra = ["--extra-index-url", index] if index else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(directory),
                    "--find-links", str(directory), *extra, *requirements], check=True, cwd=ROOT)


def cuda_wheels(directory: Path) -> list[str]:
    """Wheels that make the image a CUDA one: a torch without the ``+cpu`` build tag, NVIDIA's runtime wheels."""
    return sorted(w.name for w in directory.glob("*.whl")
                  if w.name.startswith("nvidia_") or (w.name.startswith("torch-") and "+cpu" not in w.name))


def present(directory: Path) -> dict[str, set[str]]:
    """Project name -> versions of the wheels in ``directory``."""
    found: dict[str, set[str]] = {}
    for wheel in directory.glob("*.whl"):
        name, version, *_ = parse_wheel_filename(wheel.name)
        found.setdefault(canonicalize_name(name), set()).add(str(version))
    return found


def requirements_of(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(metadata).decode("utf-8"))
    return [Requirement(line) for line in message.get_all("Requires-Dist") or []]


def missing_for_other_patches(directory: Path) -> list[str]:
    """Requirements (without markers) that some other patch release of this Python needs and no wheel meets."""
    base = {key: str(value) for key, value in default_environment().items()}
    major_minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    environments = [{**base, "python_version": major_minor, "python_full_version": f"{major_minor}.{patch}",
                     "extra": ""} for patch in PATCH_RELEASES]
    have = present(directory)
    missing: dict[str, str] = {}
    for wheel in sorted(directory.glob("*.whl")):
        for req in requirements_of(wheel):
            if req.marker is None or not any(req.marker.evaluate(env) for env in environments):
                continue  # needed on every patch release (already resolved) or on none (extras, other platforms)
            versions = have.get(canonicalize_name(req.name), set())
            if not any(req.specifier.contains(v, prereleases=True) for v in versions):
                req.marker = None
                missing[canonicalize_name(req.name)] = str(req)
    return sorted(missing.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "wheelhouse", help="the wheelhouse (default ./wheelhouse)")
    parser.add_argument("--torch-index", default=os.environ.get("TORCH_INDEX_URL", TORCH_CPU_INDEX),
                        help=f"an extra index holding the CPU torch (default $TORCH_INDEX_URL or {TORCH_CPU_INDEX}; "
                             "'' for none, where pip already finds a CPU build)")
    args = parser.parse_args(argv)
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    print(f"wheelhouse: resolving the router's dependencies into {directory}", file=sys.stderr)
    # torch alone from its CPU index first: the rest then finds it in the wheelhouse (a +cpu build ranks above
    # the same release without a tag), and no other lookup waits on that index.
    pip_wheel(directory, "torch==2.13.0", index=args.torch_index)
    pip_wheel(directory, "torch==2.13.0", "setuptools>=77", ".")
    for own in directory.glob("moe_router-*.whl"):
        own.unlink()  # the image builds the router from its source
    while extra := missing_for_other_patches(directory):
        print(f"wheelhouse: adding what other {sys.version_info.major}.{sys.version_info.minor}.* releases need: "
              f"{', '.join(extra)}", file=sys.stderr)
        pip_wheel(directory, *extra)
    if cuda := cuda_wheels(directory):
        print(f"wheelhouse: refusing a CUDA build in a CPU image: {', '.join(cuda[:5])}"
              f"{' ...' if len(cuda) > 5 else ''}; remove them and point --torch-index (or TORCH_INDEX_URL) at an "
              "index with torch's +cpu build", file=sys.stderr)
        return 1
    wheels = list(directory.glob("*.whl"))
    size_mb = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"wheelhouse: {len(wheels)} wheels, {size_mb:.0f} MB in {directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
