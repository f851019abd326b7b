"""Every dependency of pyproject.toml (dev extra included) is installed at its lower bound, as .ci/oldest.txt pins it.

Run inside the oldest venv after `pip install -c .ci/oldest.txt -e ".[dev]"`: fails when a bound and its pin
drift apart, or when a dependency gains a bound that oldest.txt does not pin.
"""

import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

root = Path(__file__).resolve().parent.parent
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
pins = {}
for line in (root / ".ci" / "oldest.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        req = Requirement(line)
        (spec,) = req.specifier
        pins[req.name.lower().replace("_", "-")] = Version(spec.version)

problems = []
for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
    req = Requirement(line)
    name = req.name.lower().replace("_", "-")
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    if not lows:
        continue
    low = max(lows)
    if pins.get(name) != low:
        problems.append(f"{req.name}: pyproject.toml says >={low}, .ci/oldest.txt pins {pins.get(name)}")
    elif Version(version(req.name)) != low:
        problems.append(f"{req.name}: {version(req.name)} installed, not the bound {low}")
if problems:
    sys.exit("oldest env out of step with pyproject.toml:\n  " + "\n  ".join(problems))
print(f"oldest env: {len(pins)} dependencies at their lower bounds")
