"""vlmsae inside other front ends: one module per peer library, each imported on its own.

- :mod:`vlmsae.integrations.nnsight`: splice / ablate / steer inside an nnsight trace (``vlmsae[nnsight]``);
- :mod:`vlmsae.integrations.lens`: a vlmsae SAE on a TransformerLens ``TransformerBridge`` (``vlmsae[lens]``).

These modules sit on top of the library core and may import any of it; nothing in the core imports
them, and ``import vlmsae`` loads neither them nor their peer libraries (tests/test_architecture.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingExtraError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (a peer library), or raise :class:`~vlmsae.errors.MissingExtraError` naming the extra.

    ``require("nnsight", "nnsight")`` returns the ``nnsight`` module, or raises with the fix:
    ``pip install "vlmsae[nnsight]"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{module} is not installed ({err}); this part of vlmsae needs it: pip install \"vlmsae[{extra}]\"") from err
