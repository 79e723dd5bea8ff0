"""The GPU differential test runs Triton kernels in the interpreter on CPU tensors (as tests/codec does);
Triton reads this when it is first imported."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
