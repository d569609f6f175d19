"""The tested library ranges: one warning line when the installed versions are outside them."""

from __future__ import annotations

from importlib import metadata

from surgvqa import versions
from surgvqa.errors import run_main


def test_installed_versions_are_the_tested_ones(capsys):
    """The suite runs against the lock (constraints.txt), which lies inside pyproject.toml's ranges."""
    assert versions.untested_versions() == []
    assert versions.warn_untested_versions() is False
    assert capsys.readouterr().err == ""


def test_one_warning_line_names_the_versions_outside_the_range(monkeypatch, capsys):
    real = metadata.version
    fake = {"transformers": "5.99.0", "torch": "2.9.1"}
    monkeypatch.setattr(versions.metadata, "version", lambda name: fake.get(name) or real(name))
    outside = versions.untested_versions()
    assert [line.split(" (")[0] for line in outside] == ["torch 2.9.1", "transformers 5.99.0"]
    assert all("(tested: " in line for line in outside)
    assert run_main(lambda: 0) == 0  # every command starts in run_main: the warning comes first
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: untested library versions: torch 2.9.1 (tested: ==2.8.0)")
    assert "transformers 5.99.0" in err[0] and "constraints.txt" in err[0]


def test_every_checked_library_has_an_upper_bound():
    """A range without an upper bound would admit releases nobody has tested (as `transformers<6` once did)."""
    from packaging.requirements import Requirement

    bounds = {}
    for line in metadata.requires("surgvqa"):
        req = Requirement(line)
        if req.marker is None:
            bounds[req.name] = {spec.operator for spec in req.specifier}
    for name in versions.CHECKED:
        assert bounds[name] & {"<", "<=", "=="}, name
