"""The two binary-image operations the detector needs (4-connected labelling, cross dilation), in
NumPy: they match ``scipy.ndimage.label`` and ``binary_dilation`` with their default structuring
element, which the tests check where SciPy is installed; the package does not depend on SciPy."""

from __future__ import annotations

from collections import deque

import numpy as np

_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a 2-D boolean mask: (labels 1..count in raster order of each
    component's first pixel, 0 outside; count)."""
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    count = 0
    for start_y, start_x in zip(*np.nonzero(mask)):
        if labels[start_y, start_x]:
            continue
        count += 1
        labels[start_y, start_x] = count
        queue = deque([(start_y, start_x)])
        while queue:
            y, x = queue.popleft()
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels, count


def dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary dilation by the 3x3 cross, ``iterations`` times; outside the image counts as False."""
    grown = np.asarray(mask, dtype=bool).copy()
    for _ in range(iterations):
        padded = np.pad(grown, 1)
        grown = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])
    return grown
