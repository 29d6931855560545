"""CCNet model family: dilated ResNet backbones, RCCA / non-local / FCN heads, losses, checkpoint import
and inference modes. Knows nothing of `repro`."""

from models import attention, checkpoints, context, heads, inference, losses, resnet, synthetic
from models.ccnet import HEADS, CCNet, build, count_parameters
from models.checkpoints import SOURCES, CheckpointError, LoadReport, export_state_dict, load_checkpoint, safe_load

__all__ = [
    "HEADS",
    "SOURCES",
    "CCNet",
    "CheckpointError",
    "LoadReport",
    "attention",
    "build",
    "checkpoints",
    "context",
    "count_parameters",
    "export_state_dict",
    "heads",
    "inference",
    "load_checkpoint",
    "losses",
    "resnet",
    "safe_load",
    "synthetic",
]
