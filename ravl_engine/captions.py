"""Which class a caption names (mitigation's class labels come from the captions, as in the paper)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


def caption_classes(captions: Sequence[str], classes: Sequence[str]) -> tuple[np.ndarray, dict[str, int]]:
    """The class each caption names, by whole-word match of the class names (case-insensitive, plural s/es).

    A longer name wins over a shorter one it contains ("sea lion" over "sea"). A caption naming two different
    classes is ambiguous and, like one naming none, gets -1 (CLIP loss only).

    Returns:
        ([N] int64 class index or -1, counts ``matched`` / ``none`` / ``ambiguous``).
    """
    order = sorted(range(len(classes)), key=lambda c: -len(classes[c]))
    patterns = [
        (c, re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, classes[c].split())) + r"(?:e?s)?(?!\w)", re.I))
        for c in order
        if classes[c].strip()
    ]
    out = np.full(len(captions), -1, dtype=np.int64)
    counts = {"matched": 0, "none": 0, "ambiguous": 0}
    for i, text in enumerate(captions):
        taken: list[tuple[int, int]] = []
        found: set[int] = set()
        for c, pattern in patterns:
            for m in pattern.finditer(text):
                if all(m.end() <= a or m.start() >= b for a, b in taken):
                    taken.append(m.span())
                    found.add(c)
        if len(found) == 1:
            out[i] = found.pop()
            counts["matched"] += 1
        else:
            counts["none" if not found else "ambiguous"] += 1
    return out, counts
