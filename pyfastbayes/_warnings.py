"""One way to warn the user: at the first frame of the caller's code, whatever the depth of the
library calls between (a fixed ``stacklevel`` points into the library when a public function
reaches the warning through one more or one fewer level than its author counted). Frames of torch
itself (``@torch.no_grad()``'s wrapper, ``Optimizer.step``'s hooks) are skipped too."""
from __future__ import annotations

import os
import sys
import warnings

import torch

_SKIP = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the innermost frame outside pyfastbayes and torch."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of warn_user
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIP):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level - 1 if frame is None else level)
