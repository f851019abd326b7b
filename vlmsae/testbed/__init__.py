"""The Shapes testbed: synthetic images whose every concept is known, small VLMs trained on them, and
concept metrics for SAE latents. The library core and the analysis layer never import it.

- :mod:`vlmsae.testbed.shapes`: images with their captions, answers and labels, deterministic from a seed;
- :mod:`vlmsae.testbed.models`: train, load and run the captioner and the QA model shipped in ``checkpoints/``
  (``python -m vlmsae.testbed train|eval``);
- :mod:`vlmsae.testbed.clip`: Shapes-CLIP, a dual encoder trained contrastively on Shapes, shipped beside them;
- :mod:`vlmsae.testbed.data`: ``ShapesData``, batches of Shapes inputs;
- :mod:`vlmsae.testbed.concepts`: concept AUROC of SAE latents and steering success;
- :mod:`vlmsae.testbed.demo`: ``vlmsae demo``.
"""

import importlib
import warnings

SUBMODULES = ("shapes", "models", "clip", "data", "concepts", "demo")


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    # Until now vlmsae.testbed was the models module: its names still resolve, with a warning, for one release.
    models = None if name.startswith("__") else importlib.import_module(f"{__name__}.models")
    if not hasattr(models, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"vlmsae.testbed.{name} moved to vlmsae.testbed.models.{name}; import it from there "
                  "(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
    return getattr(models, name)
