"""The compiled library without the kdext Python package (as a C++ user loads it):
the public per-row ops are differentiable through their C++ autograd
(csrc/autograd.cpp). The check itself, shared with ctest, is
tests/check_library_alone.py; it runs in a fresh interpreter so that nothing
kdext registers in Python is there.
"""

import os
import subprocess
import sys

import kdext


def test_per_row_ops_have_gradients_without_the_python_package():
    library = kdext._C.__file__
    script = os.path.join(os.path.dirname(__file__), "check_library_alone.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # kdext must not be importable by accident
    result = subprocess.run([sys.executable, script, library], capture_output=True, text=True, timeout=300, env=env,
                            cwd=os.path.dirname(library))
    assert result.returncode == 0, result.stdout + result.stderr
