"""Run some of a test file's tests again in a child pytest with other settings: the kernels as
plain Python (NUMBA_DISABLE_JIT=1), or a CPU feature switched off (with its own Numba cache)."""

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_child(test_file, select, timeout=300, **env):
    """Run the tests of test_file that `-k select` picks in a child pytest, with env added to
    the environment (cwd tests/, as for every child: from the checkout `import edgellm` finds
    the source folder). Fails the calling test if one fails or none runs; returns how many
    passed."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        test_file, "-k", select], env=dict(os.environ, **env),
                       capture_output=True, text=True, timeout=timeout, cwd=HERE)
    out = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, out
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and " failed" not in r.stdout, out
    return int(passed.group(1))


def python_child(code, timeout=300, **env):
    """Run `python -c code` in a child, env added to the environment, cwd tests/ (the installed
    package, not the checkout's folder). Returns its CompletedProcess."""
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=timeout, cwd=HERE)


def no_jit(test_file, select, timeout=300):
    """pytest_child with NUMBA_DISABLE_JIT=1: the kernels run as plain Python."""
    return pytest_child(test_file, select, timeout, NUMBA_DISABLE_JIT="1")
