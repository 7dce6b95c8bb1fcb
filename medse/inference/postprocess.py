"""Post-processing of predicted label maps: largest connected component per label.

Connected components come from :func:`skimage.measure.label` with full connectivity (26-neighbourhood
in 3D, as ``monai.transforms.KeepLargestConnectedComponent``'s default ``connectivity=None``). Voxels of a
label outside its largest component become background (0), as in nnU-Net's "remove all but the largest
component" post-processing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["keep_largest_component"]


def keep_largest_component(labels: np.ndarray, label_values: Iterable[int] | None = None,
                           connectivity: int | None = None) -> np.ndarray:
    """Keep only the largest connected component of each foreground label.

    Args:
        labels: integer label map (any number of dims).
        label_values: labels to process. Defaults to every non-zero value present.
        connectivity: skimage connectivity (1 = faces only ... ``ndim`` = full). Defaults to ``ndim``.

    Returns:
        A new label map of the same dtype; components removed are set to 0.
    """
    from skimage.measure import label as cc_label

    out = np.array(labels, copy=True)
    values = [int(v) for v in (np.unique(out) if label_values is None else label_values) if int(v) != 0]
    conn = out.ndim if connectivity is None else int(connectivity)
    for v in values:
        mask = out == v
        if not mask.any():
            continue
        # work inside the label's bounding box: same components, far less memory on big volumes
        idx = np.nonzero(mask)
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        sub = mask[box]
        cc, n = cc_label(sub, connectivity=conn, return_num=True)
        if n <= 1:
            continue
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        keep = int(np.argmax(sizes))
        region = out[box]
        region[(cc != keep) & sub] = 0
    return out
