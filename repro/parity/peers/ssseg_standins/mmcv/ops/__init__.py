"""mmcv.ops for sssegmentation's CCNet: `CrissCrossAttention` and `Scale` are the one stand-in every peer uses,
`repro/parity/peers/mmcv_ops_standin.py` (mmcv's parameter names query_conv, key_conv, value_conv, gamma.scale).
Other mmcv.ops names are absent: sssegmentation imports them inside try/except."""

import sys
from pathlib import Path

_PEERS = Path(__file__).resolve().parents[3]  # repro/parity/peers: ssseg_standins/mmcv/ops/__init__.py
if str(_PEERS) not in sys.path:
    sys.path.insert(0, str(_PEERS))

from mmcv_ops_standin import CrissCrossAttention, Scale  # noqa: E402

__all__ = ["CrissCrossAttention", "Scale"]
