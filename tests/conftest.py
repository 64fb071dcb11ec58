"""Make the shared test helpers importable (also inside spawned ranks)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.join(HERE, "dist"), os.path.join(HERE, "compat")):
    if path not in sys.path:
        sys.path.insert(0, path)
