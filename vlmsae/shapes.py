"""Moved to :mod:`vlmsae.testbed.shapes`; this module makes the old path work, with a warning, for one release."""

import sys
import warnings

from .testbed import shapes

warnings.warn("vlmsae.shapes moved to vlmsae.testbed.shapes; import it from there "
              "(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = shapes
