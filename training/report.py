"""The training report that goes into the weights: `loss.png` (loss and learning-rate curves).

matplotlib draws it when it is installed; otherwise a small built-in renderer (numpy + zlib) draws the same two
panels with their value ranges, so the report never depends on an optional package.
"""

from __future__ import annotations

import io
import logging
import struct
import typing as tp
import zlib

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["plot_history", "png_bytes"]


def plot_history(history: tp.Sequence[dict[str, float]]) -> bytes:
    """PNG bytes of loss (top) and lr (bottom) against the step."""
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    lr = [h["lr"] for h in history]
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return _raster_plot(steps, loss, lr)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, loss, color="tab:blue")
    ax1.set_ylabel("loss (cross-entropy)")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, lr, color="tab:orange")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """An `[H, W, 3]` uint8 image as PNG (8-bit RGB, no filtering)."""
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


# A 3x5 pixel font for the labels and numbers the fallback plot writes.
_GLYPHS = {
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001001001001",
    "8": "111101111101111",
    "9": "111101111001111",
    ".": "000000000000010",
    "-": "000000111000000",
    "+": "000010111010000",
    "e": "000111111100111",
    "l": "100100100100111",
    "o": "000111101101111",
    "s": "000111110011111",
    "r": "000111100100100",
    "t": "010111010010011",
    "p": "000111101111100",
    " ": "000000000000000",
}


def _text(img: np.ndarray, x: int, y: int, text: str, color: tuple[int, int, int], scale: int = 2) -> None:
    for i, ch in enumerate(text):
        bits = _GLYPHS.get(ch, _GLYPHS[" "])
        for r in range(5):
            for c in range(3):
                if bits[r * 3 + c] == "1":
                    y0, x0 = y + r * scale, x + (i * 4 + c) * scale
                    img[y0 : y0 + scale, x0 : x0 + scale] = color


def _panel(img, box, xs, ys, color, label) -> None:
    x0, y0, x1, y1 = box
    img[y0:y1, x0] = img[y1 - 1, x0:x1] = (90, 90, 90)
    for k in range(1, 5):  # light grid
        img[y0 + k * (y1 - y0) // 5, x0 + 1 : x1] = (230, 230, 230)
    ys = np.asarray(ys, dtype=float)
    finite = np.isfinite(ys)
    if not finite.any():
        return
    lo, hi = float(ys[finite].min()), float(ys[finite].max())
    span = hi - lo or (abs(hi) or 1.0)
    xs = np.asarray(xs, dtype=float)
    xspan = (xs.max() - xs.min()) or 1.0
    px = x0 + 2 + (xs - xs.min()) / xspan * (x1 - x0 - 4)
    py = y1 - 3 - (np.where(finite, ys, lo) - lo) / span * (y1 - y0 - 6)
    # Dense interpolation between consecutive points draws connected lines.
    for i in range(max(1, len(px) - 1)):
        j = min(i + 1, len(px) - 1)
        n = int(max(abs(px[j] - px[i]), abs(py[j] - py[i]), 1)) * 2
        for t in np.linspace(0.0, 1.0, n + 1):
            xx = int(round(px[i] + t * (px[j] - px[i])))
            yy = int(round(py[i] + t * (py[j] - py[i])))
            img[yy - 1 : yy + 1, xx - 1 : xx + 1] = color
    _text(img, x0 + 6, y0 + 4, label, color)
    _text(img, 4, y0 + 2, f"{hi:.3g}", (60, 60, 60))
    _text(img, 4, y1 - 12, f"{lo:.3g}", (60, 60, 60))


def _raster_plot(steps: list, loss: list, lr: list) -> bytes:
    width, height = 800, 520
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    if steps:
        _panel(img, (80, 10, width - 10, 250), steps, loss, (31, 119, 180), "loss")
        _panel(img, (80, 270, width - 10, 490), steps, lr, (255, 127, 14), "lr")
        _text(img, 80, 496, f"step {int(steps[0])}", (60, 60, 60))
        last = f"step {int(steps[-1])}"
        _text(img, width - 10 - len(last) * 8, 496, last, (60, 60, 60))
    return png_bytes(img)
