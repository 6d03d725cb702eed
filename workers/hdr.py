"""HDR video (PQ, HLG) turned into what an SDR screen shows, for the models, OCR and thumbnails.

FFmpeg converts an HDR stream's pixels to RGB as coded: the models saw PQ dark and flat (SDR
white at 146 of 255), HLG dimmed (189), and both with BT.2020 colours read as BT.709 ones,
washed out. `to_sdr` follows the ITU's recipe instead: the stream's transfer undone to display
light (BT.2100: PQ's EOTF; HLG's inverse OETF and its OOTF for a 1000 cd/m2 display), HDR
reference white (203 cd/m2, BT.2408) taken as SDR white, the BT.2020 colours converted to
BT.709 (BT.2087), highlights above 75% of SDR white rolled off smoothly to fit, and the
result coded for a BT.1886 screen (gamma 2.4). iPhones record HLG by default; PQ (HDR10) is
streaming and mastering footage.
"""

from __future__ import annotations

import functools

import numpy as np

#: FFmpeg's transfer characteristics (AVColorTransferCharacteristic) of the HDR transfers.
TRANSFERS = {16: "pq", 18: "hlg"}

REFERENCE_WHITE = 203.0  # cd/m2: HDR reference white, shown as SDR white (BT.2408)
HLG_PEAK = 1000.0  # cd/m2: the display HLG's OOTF is taken for (gamma 1.2, BT.2100)
KNEE = 0.75  # of SDR white: below it light is kept as it is, above it rolled off to fit
#: linear BT.2020 RGB to linear BT.709 RGB (BT.2087)
BT2020_TO_BT709 = np.array([[1.6605, -0.5876, -0.0728],
                            [-0.1246, 1.1329, -0.0083],
                            [-0.0182, -0.1006, 1.1187]], dtype=np.float32)
BT2020_LUMA = np.array([0.2627, 0.6780, 0.0593], dtype=np.float32)


def to_sdr(rgb: np.ndarray, transfer: str) -> np.ndarray:
    """HDR R'G'B' as FFmpeg converts it (uint16 [..., 3], full range, BT.2020 primaries, the
    stream's `transfer`: "pq" or "hlg") to uint8 BT.709 RGB as an SDR screen shows it."""
    light = _display_light(transfer)[rgb.reshape(-1, 3)]  # relative to SDR white
    if transfer == "hlg":
        # the OOTF scales each pixel by its scene luminance to the power gamma - 1
        scale = np.maximum(light @ BT2020_LUMA, 0) ** np.float32(0.2) * np.float32(HLG_PEAK / REFERENCE_WHITE)
        light *= scale[:, None]
    light = light @ BT2020_TO_BT709.T
    # colours outside BT.709 are clipped to its gamut; then the roll-off and the screen's coding
    # as one table, indexed by the square root of the light (fine steps in the shadows)
    top = _LIGHT_TOP[transfer]
    np.clip(light, 0, top, out=light)
    light *= np.float32(1 / top)
    np.sqrt(light, out=light)
    light *= 65535
    light += 0.5
    return _sdr_codes(transfer)[light.astype(np.uint16)].reshape(rgb.shape)


#: the most light (relative to SDR white) the code table covers: twice a transfer's peak, as
#: a saturated BT.2020 colour exceeds its peak in BT.709 terms
_LIGHT_TOP = {"pq": 2 * 10000 / REFERENCE_WHITE, "hlg": 2 * HLG_PEAK / REFERENCE_WHITE}


@functools.cache
def _sdr_codes(transfer: str) -> np.ndarray:
    """The 8-bit code (uint8 [65536]) for light (square root of its share of `_LIGHT_TOP`):
    kept below the knee, rolled off above it as K + (1 - K) t / (1 + t) for t = (x - K) / (1 - K),
    which nears SDR white as t grows, and coded for a BT.1886 screen (gamma 2.4)."""
    light = (np.arange(65536) / 65535) ** 2 * _LIGHT_TOP[transfer]
    excess = np.maximum(light - KNEE, 0) / (1 - KNEE)
    shown = np.minimum(light, KNEE) + (1 - KNEE) * excess / (1 + excess)
    return (shown ** (1 / 2.4) * 255 + 0.5).astype(np.uint8)


@functools.cache
def _display_light(transfer: str) -> np.ndarray:
    """Each 16-bit code's light (float32 [65536]): PQ's display light relative to SDR white,
    HLG's scene light (0..1), which its OOTF turns into display light per pixel."""
    signal = np.arange(65536, dtype=np.float64) / 65535
    if transfer == "pq":
        m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 4096 * 128, 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
        power = signal ** (1 / m2)
        nits = 10000 * (np.maximum(power - c1, 0) / (c2 - c3 * power)) ** (1 / m1)
        return (nits / REFERENCE_WHITE).astype(np.float32)
    if transfer == "hlg":
        a = 0.17883277
        b, c = 1 - 4 * a, 0.5 - a * np.log(4 * a)
        return np.where(signal <= 0.5, signal**2 / 3, (np.exp((signal - c) / a) + b) / 12).astype(np.float32)
    raise ValueError(f"unknown HDR transfer {transfer!r} (known: pq, hlg)")
