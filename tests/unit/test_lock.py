"""uv.lock is the environment: it matches pyproject.toml, and every way in installs from it.

``uv sync --locked`` (every Makefile target, the Dockerfile) refuses a stale lock at install
time; these tests say the same without a network, name what differs, and keep the places
that install from the lock in step with each other.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
LOCK = tomllib.loads((ROOT / "uv.lock").read_text("utf-8"))
MAKEFILE = (ROOT / "Makefile").read_text("utf-8")
DOCKERFILE = (ROOT / "Dockerfile").read_text("utf-8")
PROJECT = PYPROJECT["project"]

Declared = tuple[str, str, tuple[str, ...], str]


def declared(name: str, specifier: str, extras: list[str], marker: str | None) -> Declared:
    """One requirement in a form both files reduce to: order of specifiers and extras and
    the spelling of names and markers do not matter."""
    return (
        canonicalize_name(name),
        str(SpecifierSet(specifier)),
        tuple(sorted(canonicalize_name(e) for e in extras)),
        str(Marker(marker)) if marker else "",
    )


def from_pyproject() -> set[Declared]:
    found = set()
    groups = [(None, PROJECT["dependencies"])]
    groups += list(PROJECT["optional-dependencies"].items())
    for extra, requirements in groups:
        for text in requirements:
            req = Requirement(text)
            assert req.marker is None, f"{text}: markers are not expected here"
            marker = f"extra == '{extra}'" if extra else None
            found.add(declared(req.name, str(req.specifier), list(req.extras), marker))
    return found


def locked_project() -> dict[str, Any]:
    (project,) = [p for p in LOCK["package"] if p["name"] == PROJECT["name"]]
    return project


def from_lock() -> set[Declared]:
    return {
        declared(r["name"], r.get("specifier", ""), r.get("extras", []), r.get("marker"))
        for r in locked_project()["metadata"]["requires-dist"]
    }


def locked_versions() -> dict[str, list[Version]]:
    versions: dict[str, list[Version]] = {}
    for package in LOCK["package"]:
        versions.setdefault(package["name"], []).append(Version(package["version"]))
    return versions


def uv_version() -> str:
    match = re.search(r"^UV_VERSION\s*:?=\s*(\S+)$", MAKEFILE, re.MULTILINE)
    assert match, "the Makefile pins no UV_VERSION"
    return match[1]


def test_the_lock_was_made_from_this_pyproject() -> None:
    in_pyproject, in_lock = from_pyproject(), from_lock()
    assert in_pyproject - in_lock == set(), "not in uv.lock: run `make lock`"
    assert in_lock - in_pyproject == set(), "only in uv.lock: run `make lock`"
    assert LOCK["requires-python"] == PROJECT["requires-python"]
    extras = set(locked_project()["metadata"]["provides-extras"])
    assert extras == set(PROJECT["optional-dependencies"])


def test_every_locked_version_is_in_its_declared_range() -> None:
    versions = locked_versions()
    for name, specifier, _, _ in from_pyproject():
        assert versions.get(name), f"{name} is declared but not locked"
        for version in versions[name]:
            assert version in SpecifierSet(specifier), f"{name} {version} outside {specifier}"


def test_every_locked_file_has_a_hash_and_comes_from_pypi() -> None:
    files = 0
    for package in LOCK["package"]:
        if package["name"] == PROJECT["name"]:
            continue
        assert package["source"] == {"registry": "https://pypi.org/simple"}, package["name"]
        for artifact in [*package.get("wheels", []), package.get("sdist")]:
            if artifact:
                files += 1
                assert artifact["hash"].startswith("sha256:"), package["name"]
                assert artifact["url"].startswith("https://files.pythonhosted.org/")
    assert files > len(LOCK["package"])  # at least one file a package


def test_one_uv_version_everywhere() -> None:
    version = uv_version()
    assert Version(version) in SpecifierSet(PYPROJECT["tool"]["uv"]["required-version"])
    assert re.search(rf"^ARG UV_VERSION={re.escape(version)}$", DOCKERFILE, re.MULTILINE)


def test_every_install_is_from_the_lock_and_refuses_a_stale_one() -> None:
    sync = re.search(r"^SYNC\s*:=\s*(.+)$", MAKEFILE, re.MULTILINE)
    assert sync and "sync --locked" in sync[1]
    for target in ("install", "bench"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", MAKEFILE, re.MULTILINE)
        assert recipe and "$(SYNC)" in recipe[1], target
    for target in ("test", "demo", "lint", "unit", "docs"):
        prerequisites = re.search(rf"^{target}:(.*)$", MAKEFILE, re.MULTILINE)
        assert prerequisites and "install" in prerequisites[1].split(), target
    assert "pip install -e" not in MAKEFILE
    # As pip does: where PYTHONDONTWRITEBYTECODE is set, nothing else would write .pyc files.
    assert "export UV_COMPILE_BYTECODE := 1" in MAKEFILE
    assert "UV_COMPILE_BYTECODE=1" in DOCKERFILE
    assert "COPY pyproject.toml uv.lock" in DOCKERFILE
    runs = re.findall(r"^RUN (?:.*\\\n)*.*$", DOCKERFILE, re.MULTILINE)
    installs = [run for run in runs if "sync" in run or "pip install" in run]
    assert installs and all("uv sync --locked" in run or "uv==" in run for run in installs)
    assert "make test" in (ROOT / ".ci" / "run").read_text("utf-8")
