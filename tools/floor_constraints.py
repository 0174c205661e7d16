"""Print pip constraints that pin every runtime dependency of pyproject.toml at the floor it declares (`>=X` -> `==X`).

`make test-oldest` installs the package under these constraints, so the lower bounds that pyproject.toml promises are
the versions the suite runs against. Dependencies without a floor are left to pip (they resolve to the newest release
compatible with the floors, as do transitive dependencies).
"""

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def floor_constraints(pyproject: Path = PYPROJECT) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for requirement in dependencies:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        floor = re.search(r">=\s*([^,;\s]+)", requirement)
        if floor:
            pins.append(f"{name}=={floor.group(1)}")
    return pins


if __name__ == "__main__":
    sys.stdout.write("".join(pin + "\n" for pin in floor_constraints()))
