"""Typed errors. Each message names the bad value and the fix."""


class VlmsaeError(Exception):
    """Base class of every error vlmsae raises on purpose."""


class UnsupportedModelError(VlmsaeError, TypeError):
    """The model object is not one of the supported families (or is wrapped in a way we cannot hook)."""


class LayerIndexError(VlmsaeError, IndexError):
    """A layer index outside 0..n_layers-1."""


class SiteError(VlmsaeError, ValueError):
    """An unknown hook site name, or a site attached twice in one context."""


class ConfigError(VlmsaeError, ValueError):
    """A configuration value that cannot work (checked before anything large is allocated)."""


class SAEFileError(VlmsaeError, ValueError):
    """An SAE folder that is missing, incomplete, corrupt or disagrees with its own config."""


class NonFiniteError(VlmsaeError, FloatingPointError):
    """NaN or Inf in activations, loss or gradients."""


class HookNameWarning(UserWarning):
    """An SAE used at a site other than the ``hook_name`` its metadata says it was trained at."""


class MissingExtraError(VlmsaeError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install "vlmsae[extra]"`` that adds it."""
