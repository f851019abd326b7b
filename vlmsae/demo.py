"""Moved to :mod:`vlmsae.testbed.demo`; this module makes the old path work, with a warning, for one release."""

import sys
import warnings

from .testbed import demo

warnings.warn("vlmsae.demo moved to vlmsae.testbed.demo; import it from there "
              "(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = demo
