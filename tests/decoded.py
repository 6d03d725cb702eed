"""The reference the frame readers are checked against: a video decoded in order."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from workers.pyav_source import SCALER_OPTIONS


def every_frame(path: Path) -> list[np.ndarray]:
    """All of a video's frames as PyAV decodes them in order, with no seeking or skipping."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24", **SCALER_OPTIONS) for frame in container.decode(video=0)]
