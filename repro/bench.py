"""`python -m repro.bench`: the command line of `repro.measure.bench` (operators), or with `--inference` of
`repro.measure.engine_bench` (CCNet in torch, ONNX Runtime and OpenVINO -> results/inference_bench.csv)."""

import sys

if __name__ == "__main__":
    if "--inference" in sys.argv[1:]:
        from repro.measure.engine_bench import main as inference_main

        sys.exit(inference_main([a for a in sys.argv[1:] if a != "--inference"]))
    from repro.measure.bench import main

    sys.exit(main())
