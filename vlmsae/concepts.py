"""Moved to :mod:`vlmsae.testbed.concepts`; this module makes the old path work, with a warning, for one release."""

import sys
import warnings

from .testbed import concepts

warnings.warn("vlmsae.concepts moved to vlmsae.testbed.concepts; import it from there "
              "(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = concepts
