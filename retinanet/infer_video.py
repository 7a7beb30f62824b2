"""`retinanet infer --video`: the detections of every frame to JSON, and optionally the
annotated video (H.264), drawn and encoded in a thread of its own while frames are decoded
and detected."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time

from .draw import DRAW_THRESHOLD, layout, render
from .errors import UserError
from .files import atomic_write, check_output
from .runtime import Detections, Detector
from .video import VideoWriter


def frame_records(index: int, timestamp: float, dets: Detections, box_offset: float) -> list[dict]:
    """COCO-style result records of one frame: image_id is the frame index."""
    return [
        {"image_id": index, "frame": index, "timestamp": round(timestamp, 6), **r}
        for r in dets.records(index, box_offset)
    ]


class Annotator:
    """Draws and encodes frames in a background thread; errors surface on close()."""

    def __init__(self, writer: VideoWriter, threshold: float):
        self.writer, self.threshold = writer, threshold
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(32)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, frame, dets: Detections) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((frame, dets))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain, so put() never blocks on a dead writer
            try:
                frame, dets = item
                rgb = frame.permute(1, 2, 0).cpu().numpy()
                self.writer.write(render(rgb, layout(dets, rgb.shape[0], rgb.shape[1], self.threshold)))
            except BaseException as e:  # reported on the main thread
                self.error = e

    def close(self, failed: bool) -> None:
        self._queue.put(None)
        self._thread.join()
        self.writer.close(failed or self.error is not None)
        if self.error is not None and not failed:
            raise self.error


def check_video_outputs(output: str, drawn: str | None, override: bool) -> None:
    """Before any work: both outputs writable, nothing replaced without --override."""
    check_output(output, override, "--output file")
    check_drawn_video(drawn, override)


def check_drawn_video(drawn: str | None, override: bool) -> None:
    if drawn is not None:
        if not drawn.lower().endswith(".mp4"):
            raise UserError(f"{drawn}: --draw with --video writes an H.264 video: give it a .mp4 name")
        check_output(drawn, override, "--draw video")


def infer_video(
    detector: Detector,
    source: str,
    output: str,
    batch: int,
    drawn: str | None = None,
    threshold: float = DRAW_THRESHOLD,
    timeout: float | None = None,
    override: bool = False,
) -> int:
    """Run over every frame of `source`; write the records (and the video). Returns the frame count.

    Ctrl-C (a live source has no end) or a source that goes silent stops the reading;
    what was detected up to there is still written."""
    check_video_outputs(output, drawn, override)
    reader = detector.open_video(source, timeout)
    annotator = Annotator(VideoWriter(drawn, reader.width, reader.height, reader.rate), threshold) if drawn else None
    records: list[dict] = []
    frames, start, stopped, failed = 0, time.perf_counter(), None, True
    try:
        for index, at, frame, dets in detector.detect_frames(reader, batch):
            records += frame_records(index, at, dets, detector.config.box_offset)
            if annotator is not None:
                annotator.put(frame, dets)
            frames += 1
        failed = False
    except KeyboardInterrupt:
        print(f"\n{source}: interrupted; writing the {frames} frames detected", file=sys.stderr)
        failed = False
    except UserError as e:  # the source stalled or broke off: keep what was read
        stopped, failed = e, frames == 0
    finally:
        reader.close()
        if annotator is not None:
            annotator.close(failed)
    if stopped is not None and frames == 0:
        raise stopped
    seconds = time.perf_counter() - start
    with atomic_write(output, "w") as f:
        f.write(json.dumps(records))
    print(f"wrote {len(records)} detections of {frames} frames to {output}" + (f" and {drawn}" if drawn else ""))
    if stopped is not None:  # the error is the one line on stderr
        raise stopped
    print(f"infer: {frames} frames in {seconds:.2f} s ({frames / max(seconds, 1e-9):.1f} frames/s)", file=sys.stderr)
    return frames
