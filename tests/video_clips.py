"""Clips the video tests make with PyAV: shapes of the demo's classes moving over a gradient."""

from __future__ import annotations

import numpy as np

from retinanet.data.demo import SIZE


def frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame i: a red square moving right, a green disc moving left, a blue triangle moving down."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[...] = (60 + 100 * xx // width)[..., None]
    s = max(16, min(width, height) * 40 // SIZE)
    x = (8 + 2 * i) % (width - s)
    img[height // 5 : height // 5 + s, x : x + s] = (230, 40, 40)
    cx, cy = width - s - (3 * i) % (width - 2 * s), height * 3 // 5
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < (s // 2) ** 2] = (40, 220, 40)
    top = (5 + i) % (height - s)
    tri = (yy >= top) & (yy < top + s) & (np.abs(xx - width // 2) <= (yy - top) // 2)
    img[tri] = (40, 40, 230)
    return img


def make_clip(path, frames: int = 60, width: int = 160, height: int = 128, rate: int = 30, fmt: str | None = None):
    """An H.264 clip of `frames` frames (MP4, or `fmt` such as "mpegts"); returns the frames written."""
    import av

    written = []
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = frame(i, width, height)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for packet in stream.encode(f):
                out.mux(packet)
            written.append(img)
        for packet in stream.encode():
            out.mux(packet)
    return written


def decoded_frames(path) -> list[np.ndarray]:
    """Every frame of a clip as FFmpeg decodes and converts it (HxWx3 uint8 RGB)."""
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
