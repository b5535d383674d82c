"""Test the installed edgellm, not the source tree.

`python -m pytest` puts the checkout's root first on sys.path, where edgellm/ lacks the runtime
and converters subpackages (pyproject maps runtime/ and converters/ into edgellm at install time).
Dropping the root makes `import edgellm` find the installed package (editable or not).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
