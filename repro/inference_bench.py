"""`python -m repro.inference_bench`: the command line of `repro.measure.inference_bench`, with mmsegmentation's
venv from the parity room: the torch path's inference forms against mmsegmentation 1.2.2's own model.

`python -m repro.bench --inference` writes the same results/inference_bench.csv, through the same writer
(`repro.measure.inference_bench.write_rows`), with other variants: torch eager against the export engines
(ONNX Runtime, OpenVINO). Two commands because they need different environments (this one mmsegmentation's
venv, built by the parity room; that one the `[deploy]` extra) and compare different models (mmsegmentation's
config with its weights; an exported random CCNet)."""

import sys

from repro.measure.inference_bench import CONFIGS, PeerSpec, main
from repro.parity.cli import peer_python
from repro.parity.common import PEERS_DIR
from repro.parity.mmseg import NAME, mmseg_config_name, peer_config_path


def resolve_peer(backbone: str) -> PeerSpec:
    python = peer_python(NAME)
    return PeerSpec(python, PEERS_DIR / "mmseg_bench_peer.py",
                    peer_config_path(python, mmseg_config_name(CONFIGS[backbone])))


if __name__ == "__main__":
    sys.exit(main(resolve_peer=resolve_peer))
