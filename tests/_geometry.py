"""Geometry shared by several test modules (pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import numpy as np


def oblique_affine(shape) -> np.ndarray:
    """Rotated (20 and 10 degrees), anisotropic (3.5 x 3 x 4.5 mm), L-flipped grid centred on the world origin."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = rz @ rx @ np.diag([-3.5, 3.0, 4.5])
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = -m @ ((np.asarray(shape) - 1) / 2)
    return aff
