"""Hard-link torch and its Triton/CUDA distributions from one virtual environment into another.

    python link_torch.py SOURCE_SITE_PACKAGES TARGET_SITE_PACKAGES

CI installs the package twice into fresh environments; torch with its CUDA libraries is ~5.5 GB,
most of the install time. These distributions are runtime dependencies of the package (torch is
declared; the rest are torch's own), resolved by pip from the same requirements in the first
environment, so the second gets the very same files as links instead of a second unpacking; pip
then installs everything else into it from the wheel's own requirements. Test-only packages are
never linked, so the second environment still shows a missing runtime dependency.
Console scripts (outside site-packages) are not linked.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
from importlib.metadata import distributions
from pathlib import Path

LINKED = ("torch", "triton", "nvidia-*", "cuda-*")


def normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def link_distributions(source: Path, target: Path) -> list[str]:
    linked = []
    for dist in distributions(path=[str(source)]):
        name = normalized(dist.metadata["Name"])
        if not any(fnmatch.fnmatch(name, pattern) for pattern in LINKED):
            continue
        for file in dist.files or []:
            relative = Path(str(file))
            origin = source / relative
            if relative.parts[:1] == ("..",) or not origin.is_file():
                continue  # console scripts, and byte code RECORD lists but nobody wrote
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(origin, destination)
            except OSError:  # another file system, or links not allowed: copy
                shutil.copy2(origin, destination)
        linked.append(f"{dist.metadata['Name']}=={dist.version}")
    return sorted(linked)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[2].strip())
    print("linked:", " ".join(link_distributions(Path(sys.argv[1]), Path(sys.argv[2]))) or "nothing")
