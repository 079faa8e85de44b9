"""The acquisition's mirror image: gathers and velocity models flipped along x.

The physically consistent flip (:func:`flip_inputs`, mode ``consistent``) mirrors the
receivers *and* reverses the source order (the source at x = 1 m swaps with the one at
x = 300 m); the seed's ``receivers`` flip (source order kept) is available for comparison
only.  :func:`flip_target` mirrors a velocity model to match.  Both take torch tensors or
numpy arrays; training augments with them and inference uses them for test-time augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.checkpoint

from speedstructure.config.schema import (
    FLIP_MODES,
)

# ----------------------------------------------------------------------------- flips


def flip_inputs(x, mode: str = "consistent"):
    """Mirror gathers ``(..., 5, T, 31)`` (torch or numpy) horizontally.

    ``consistent``: receivers mirrored and the source order reversed (the physical mirror
    image of the experiment).  ``receivers``: receivers mirrored only (the seed's flip).
    Applying the same flip twice gives back the input.
    """
    if mode not in FLIP_MODES:
        raise ValueError(f"flip mode {mode!r}: expected one of {FLIP_MODES}")
    dims = (-3, -1) if mode == "consistent" else (-1,)
    if isinstance(x, np.ndarray):
        return np.flip(x, axis=dims).copy()
    return torch.flip(x, dims=dims)


def flip_target(y):
    """Mirror velocity models ``(..., 300, 1259)`` (torch or numpy) along x."""
    if isinstance(y, np.ndarray):
        return np.flip(y, axis=-2).copy()
    return torch.flip(y, dims=(-2,))
