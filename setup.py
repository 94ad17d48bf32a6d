"""Package discovery for the mapped source folders (metadata lives in pyproject.toml).

The distribution keeps the repository's top-level folders (compose/ is the ``loracompose`` package,
pipelines/ is ``loracompose.pipelines``, ...). setuptools' ``find`` cannot map several folders to one
namespace, so every package below each mapped folder is found here instead of kept by hand.
"""

from setuptools import find_packages, setup

PACKAGE_FOLDERS = {
    "loracompose": "compose",
    "loracompose.pipelines": "pipelines",
    "loracompose.attention": "attention",
    "loracompose.eval": "eval",
    "loracompose.ui": "ui",
}


def discovered_packages() -> list[str]:
    packages = []
    for package, folder in PACKAGE_FOLDERS.items():
        packages.append(package)
        packages += [f"{package}.{sub}" for sub in find_packages(folder)]
    return packages


setup(packages=discovered_packages(), package_dir=PACKAGE_FOLDERS)
