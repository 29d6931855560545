"""`python -m repro.export`: ONNX export of a config and checkpoint (`repro.engine.export_cli`), or with
`--agreement` the engine agreement table on trained models (`repro.pipeline.deploy`)."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--agreement" in argv:
        from repro.pipeline.deploy import main as agreement_main

        return agreement_main([a for a in argv if a != "--agreement"])
    from repro.engine.export_cli import main as export_main

    return export_main(argv)


if __name__ == "__main__":
    sys.exit(main())
