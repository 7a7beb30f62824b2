"""retinanet: fast single-stage object detection on NVIDIA GPUs."""

from .draw import draw
from .runtime import Detections, Detector, load

__all__ = ["load", "draw", "Detector", "Detections"]
__version__ = "0.1.0"
