"""The library versions surgvqa was tested with, and one warning line when the installed ones are outside them.

The tested ranges are the package's own requirements (``pyproject.toml``, read back from the installed metadata),
so they are declared once: ``constraints.txt`` pins the exact versions the suite last passed with, and the upper
bounds in ``pyproject.toml`` go no further than what has been tested. A leaf module: it imports nothing from
``surgvqa``.
"""

from __future__ import annotations

import sys
from importlib import metadata

#: the libraries whose behaviour the numbers depend on (model code, adapters, kernels)
CHECKED = ("torch", "transformers", "peft")


def untested_versions(packages: tuple[str, ...] = CHECKED) -> list[str]:
    """``"<name> <installed> (tested: <range>)"`` for each of ``packages`` installed outside surgvqa's range."""
    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("surgvqa") or []
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed: nothing to compare
        return []
    outside = []
    for line in requires:
        req = Requirement(line)
        if req.name not in packages or req.marker is not None:
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue
        if not req.specifier.contains(installed, prereleases=True):
            outside.append(f"{req.name} {installed} (tested: {req.specifier})")
    return outside


def warn_untested_versions() -> bool:
    """Print one ``warning:`` line on stderr when a checked library is outside its tested range; True if so."""
    outside = untested_versions()
    if outside:
        print(f"warning: untested library versions: {'; '.join(outside)}. Results may differ from the tested "
              "setup; `make venv` installs the tested versions (constraints.txt)", file=sys.stderr)
    return bool(outside)


__all__ = ["CHECKED", "untested_versions", "warn_untested_versions"]
