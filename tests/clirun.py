"""Run the edgellm command line in a child process, as a user would."""

import subprocess
import sys
import tempfile


def edgellm_cli(*args, timeout=300, input=None):
    """cwd outside the checkout, so that `-m` finds the installed package (in a non-editable
    install the checkout's own folders do not form the package). input: text for its stdin."""
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=tempfile.gettempdir(), input=input)
