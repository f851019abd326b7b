"""Old names that keep working for one release, each with a ``DeprecationWarning`` that names the new one.

Renamed in 0.2 (removed in 0.3), one term per concept:

==========================================  =====================================================
old                                         new
==========================================  =====================================================
``Recording.mask(layer)``                   ``Recording.kinds(layer)`` (it returns kinds, not a mask)
``error=`` (splice, reconstruct)            ``use_error_term=`` (SAELens' name)
``SAEConfig.kind``, ``SAE(kind=...)``       ``architecture`` (``Kind`` is a token kind)
``scan(k=...)``                             ``scan(n_examples=...)`` (``k`` is the SAE's TopK)
``features`` (of an SAE)                    ``latents``: ``feature_table`` -> ``latent_table``,
                                            ``features=`` -> ``latents=``
``TrainConfig`` (vlmsae.train)              ``OnlineRunConfig``
``TrainerConfig`` (vlmsae.trainer)          ``SAETrainerConfig``
``TrainConfig`` (vlmsae.testbed.models)     ``TestbedModelConfig``
``OnlineRunConfig(lr=, sync_every=)``       ``SAETrainerConfig(lr=, sync_every=)``
``vlmsae.train(...)`` as an SAE / list      ``vlmsae.train(...).sae`` / ``.saes`` (a ``TrainResult``)
==========================================  =====================================================
"""

import functools
import warnings
from collections.abc import Callable

from vlmsae.errors import ConfigError

REMOVED_IN = "0.3"


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn (``DeprecationWarning``) that ``old`` is now called ``new``."""
    warnings.warn(f"{old} is deprecated and will be removed in vlmsae {REMOVED_IN}; use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed_kwargs(**old_to_new: str) -> Callable:
    """Decorator: a call passing an old keyword gets it under its new name, with a ``DeprecationWarning``.

    Raises:
        ConfigError: the call passes both the old and the new name.
    """
    def wrap(fn: Callable) -> Callable:
        name = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise ConfigError(f"{name}() got both {old}= and {new}=; pass only {new}= "
                                          f"({old}= is its old name)")
                    warn_renamed(f"{name}({old}=...)", f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return call
    return wrap


def renamed_attributes(module_name: str, renames: dict[str, str], namespace: dict) -> Callable[[str], object]:
    """A module ``__getattr__`` that serves old module attributes under their new names, with a warning."""
    def __getattr__(name: str):
        if name in renames:
            warn_renamed(f"{module_name}.{name}", f"{module_name}.{renames[name]}")
            return namespace[renames[name]]
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    return __getattr__
