# The compiled Cython extension (rendered from _cython_kernels.pyx.tp). mypy cannot read
# a .so: this stub only says the module exists; its kernels are checked against the
# kernel contract at import (backends/_spec.py) and by tests/test_kernels.py.
from typing import Any

def __getattr__(name: str) -> Any: ...
