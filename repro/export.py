"""`python -m repro.export`: ONNX export of a config and checkpoint (`repro.engine.export_cli`), or with
`--agreement` the engine agreement table on trained models (`repro.pipeline.deploy`)."""

import sys

if __name__ == "__main__":
    if "--agreement" in sys.argv[1:]:
        from repro.pipeline.deploy import main as agreement_main

        sys.exit(agreement_main([a for a in sys.argv[1:] if a != "--agreement"]))
    from repro.engine.export_cli import main

    sys.exit(main())
