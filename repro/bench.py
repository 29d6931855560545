"""`python -m repro.bench`: the command line of `repro.measure.bench` (operators), or with `--inference` of
`repro.measure.engine_bench` (CCNet in torch, ONNX Runtime and OpenVINO -> results/inference_bench.csv; the torch
path against mmsegmentation's own model is `python -m repro.inference_bench`, into the same file through the same
writer)."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--inference" in argv:
        from repro.measure.engine_bench import main as inference_main

        return inference_main([a for a in argv if a != "--inference"])
    from repro.measure.bench import main as operator_main

    return operator_main(argv)


if __name__ == "__main__":
    sys.exit(main())
