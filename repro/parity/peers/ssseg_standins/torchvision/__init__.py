"""Stand-in for the torchvision names sssegmentation 1.7.0 imports (see ../README.md); peer venv only."""

from torchvision import ops, transforms

__version__ = "0.0+ccrepro-standin"


def _is_tracing() -> bool:
    """torchvision._is_tracing: whether TorchScript is tracing."""
    import torch

    return torch._C._get_tracing_state() is not None


__all__ = ["ops", "transforms", "__version__"]
