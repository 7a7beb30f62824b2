"""retinanet: fast single-stage object detection on NVIDIA GPUs."""

from .runtime import Detections, Detector, load

__all__ = ["load", "Detector", "Detections"]
__version__ = "0.1.0"
