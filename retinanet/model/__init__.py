from .detector import RetinaNet

__all__ = ["RetinaNet"]
