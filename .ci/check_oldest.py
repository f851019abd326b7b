"""Every dependency of pyproject.toml, every extra's included, is installed at its lower bound, as .ci/oldest.txt
pins it.

Run inside the oldest venv after `pip install -c .ci/oldest.txt -e ".[dev]"` (dev pulls in every other extra):
fails when a bound and its pin drift apart, when a dependency gains a bound that oldest.txt does not pin, or when
an extra is not reached from dev (its bounds would go untested).
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

extras = project["optional-dependencies"]
problems = []


def expand(extra: str, seen: frozenset = frozenset()) -> list[str]:
    """The requirement lines vlmsae[extra] installs, through the vlmsae[...] extras it names."""
    if extra not in extras:
        problems.append(f"vlmsae[{extra}] is named in pyproject.toml but is not one of its extras {sorted(extras)}")
        return []
    lines = []
    for line in extras[extra]:
        req = Requirement(line)
        if req.name.lower() != project["name"]:
            lines.append(line)
        else:  # a self-reference such as vlmsae[nnsight,lens]; seen stops a cycle of them
            lines += [x for e in sorted(req.extras - seen - {extra}) for x in expand(e, seen | {extra})]
    return lines


dev = expand("dev")
problems += [f"vlmsae[{extra}] needs {sorted(set(expand(extra)) - set(dev))}, which vlmsae[dev] does not install; "
             "add the extra to dev's vlmsae[...]" for extra in sorted(extras) if not set(expand(extra)) <= set(dev)]
lines = project["dependencies"] + dev
for line in lines:
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
