"""The version ranges of pyproject.toml, the lock (constraints.txt) and the floors `make test-oldest` installs agree,
and the stack this suite runs on lies inside the ranges."""

import importlib.util
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO_ROOT = Path(__file__).resolve().parent.parent


def requirements() -> list[Requirement]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return [Requirement(line) for line in pyproject["project"]["dependencies"]]


def pins(text: str) -> dict[str, Version]:
    """`name==version` lines (comments skipped) -> {normalised name: version}."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"not an exact pin: {line!r}"
            found[normalise(name)] = Version(pinned)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_dependency_inside_its_range():
    locked = pins((REPO_ROOT / "constraints.txt").read_text())
    for requirement in requirements():
        name = normalise(requirement.name)
        assert name in locked, f"constraints.txt does not pin {requirement.name}: run `make lock`"
        assert requirement.specifier.contains(locked[name]), (
            f"constraints.txt pins {requirement.name}=={locked[name]}, outside pyproject.toml's "
            f"{requirement.specifier}: run `make lock`"
        )
    assert "+" not in str(locked["torch"]), "the torch pin must not carry a local label (+cpu): PyPI has none"


def test_floor_constraints_pin_every_lower_bound():
    spec = importlib.util.spec_from_file_location("floor_constraints", REPO_ROOT / "tools" / "floor_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    floors = pins("\n".join(module.floor_constraints()))
    for requirement in requirements():
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        name = normalise(requirement.name)
        if not lower:
            assert name not in floors
            continue
        assert floors[name] == Version(lower[0])
        assert requirement.specifier.contains(floors[name]), f"{requirement} excludes its own floor"


def test_the_installed_stack_is_inside_the_ranges():
    """Whichever environment runs the suite (locked, newest, floors), it satisfies pyproject.toml."""
    for requirement in requirements():
        installed = Version(version(requirement.name))
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{requirement.name} {installed} is installed, outside {requirement.specifier}"
        )


@pytest.mark.parametrize("version", ["5.10.4", "5.25.0"])
def test_calm_serve_names_the_transformers_it_is_built_on(version, monkeypatch):
    """`calm serve` is built on transformers 5.24's internal serving classes: on another release it says which to
    install (test_serve.py skips with that message there), instead of failing on a moved name."""
    import sys

    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    monkeypatch.delitem(sys.modules, "transformers_calm.serving", raising=False)
    with pytest.raises(ImportError, match=rf"built on transformers 5.24's server, and this is transformers {version}"):
        import transformers_calm.serving  # noqa: F401
