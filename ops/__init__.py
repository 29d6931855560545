"""Attention operators: criss-cross (naive PyTorch, its functional form for ONNX export, and fused Triton backends)
and the non-local baseline."""

from ops import cost
from ops.cca_maps import criss_cross_map, criss_cross_probabilities, off_cross_share, point_attention
from ops.criss_cross import BACKENDS, CrissCrossAttention, criss_cross_attention, resolve_backend
from ops.non_local import NonLocal2d, non_local_attention

__all__ = [
    "BACKENDS",
    "CrissCrossAttention",
    "NonLocal2d",
    "cost",
    "criss_cross_map",
    "criss_cross_probabilities",
    "criss_cross_attention",
    "non_local_attention",
    "off_cross_share",
    "point_attention",
    "resolve_backend",
]
