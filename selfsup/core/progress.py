"""The progress bars of the long steps outside training (writing shards, extracting probe features):
tqdm on stderr, with a total wherever it is known, so that stdout keeps the results. Shown whether
or not stderr is a terminal, as Lightning's training bar is."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress_bar(iterable: Iterable | None = None, *, total: int | None, desc: str, unit: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                disable=not enabled)
