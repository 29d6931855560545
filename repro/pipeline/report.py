"""`python -m repro.report [--results DIR] [--experiments DIR]`: results/*.csv -> results/REPORT.md.

Everything in the report is read from files the other steps wrote (CSVs, the experiment YAMLs' `reported:`
values, plots); nothing is typed by hand, so the report can be regenerated at any time without rerunning
anything. A section whose CSV is missing says so and names the command that produces it.
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from repro.engine.config import load_config
from repro.io import atomic_write_text

REPORT_NAME = "REPORT.md"
# (file, command that produces it) for every CSV the report reads.
SOURCES = {
    "environment": ("environment.csv", "python -m repro.reproduce (writes it first)"),
    "pipeline": ("reproduce_status.csv", "python -m repro.reproduce"),
    "claims": ("claims.csv", "python -m repro.claims --out results"),
    "miou": ("miou.csv", "python -m repro.run experiments/NAME.yaml (needs the dataset)"),
    "experiments": ("experiments_status.csv", "python -m repro.reproduce (checks every config's dataset)"),
    "synthetic": ("synthetic_ablation.csv", "python -m repro.synthetic --out results"),
    "reach": ("attention_reach.csv", "python -m repro.synthetic --out results"),
    "ops_bench": ("ops_bench.csv", "python -m repro.bench"),
    "efficiency": ("model_efficiency.csv", "python -m repro.profile experiments/*.yaml"),
    "gpu": ("gpu_acceptance.csv", "nox -s gpu (python -m repro.gpu) on a CUDA machine"),
}


def format_cell(value: object) -> str:
    """One table cell: floats to 4 significant digits, missing values empty, pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of `frame` (no index); a note when it has no rows."""
    if frame.empty:
        return "_(no rows)_\n"
    columns = [str(column) for column in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(value) for value in row) + " |")
    return "\n".join(lines) + "\n"


def read_csv(results: Path, key: str) -> pd.DataFrame | None:
    """The CSV for section `key`, or None when it does not exist."""
    path = results / SOURCES[key][0]
    if not path.exists():
        return None
    return pd.read_csv(path)


def missing(key: str) -> str:
    name, command = SOURCES[key]
    return f"_`{name}` not found: produce it with `{command}`._\n"


def plot(results: Path, name: str, caption: str) -> str:
    path = results / "plots" / name
    if not path.exists():
        return f"_Plot `plots/{name}` not found._\n"
    return f"![{caption}](plots/{name})\n"


def _require(frame: pd.DataFrame, columns: list[str], name: str) -> None:
    absent = [column for column in columns if column not in frame.columns]
    if absent:
        raise ValueError(f"{name} lacks columns {absent}; has {list(frame.columns)}")


def section_environment(results: Path) -> str:
    text = "## Environment\n\n"
    frame = read_csv(results, "environment")
    text += missing("environment") if frame is None else markdown_table(frame)
    devices = set()
    for key in ("claims", "synthetic", "ops_bench", "efficiency", "miou"):
        other = read_csv(results, key)
        if other is not None and "device" in other.columns:
            devices.update(str(device) for device in other["device"].dropna().unique())
    if devices:
        text += f"\nDevices named in the result CSVs: {', '.join(sorted(devices))}.\n"
    return text


def section_pipeline(results: Path) -> str:
    text = "## Pipeline steps\n\n"
    frame = read_csv(results, "pipeline")
    if frame is None:
        return text + missing("pipeline")
    # Commands and full messages stay in the CSV; the report keeps one readable line per step.
    shown = frame.drop(columns=[column for column in ("command",) if column in frame.columns])
    if "detail" in shown.columns:
        shown["detail"] = [
            detail if len(detail) <= 100 else detail[:97] + "..."
            for detail in shown["detail"].fillna("").astype(str)
        ]
    return text + markdown_table(shown) + f"\nCommands and full messages: `{SOURCES['pipeline'][0]}`.\n"


def section_claims(results: Path) -> str:
    text = "## Efficiency claims (criss-cross vs non-local)\n\n"
    frame = read_csv(results, "claims")
    if frame is None:
        return text + missing("claims")
    _require(frame, ["claim", "variant", "metric", "value", "unit", "reported_value", "method"], "claims.csv")
    reported = frame[frame["reported_value"].notna()].copy()
    reported["measured/reported"] = reported["value"] / reported["reported_value"]
    columns = [column for column in (
        "claim", "variant", "recurrence", "batch", "channels", "qk_channels", "height", "width", "metric",
        "value", "unit", "reported_value", "measured/reported", "method", "device",
    ) if column in reported.columns]
    text += "Rows with a reported value (the paper's / authors' figures) beside the measured one:\n\n"
    text += markdown_table(reported[columns])
    if "source" in reported.columns:
        sources = "; ".join(sorted(str(source) for source in reported["source"].dropna().unique()))
        text += f"\nReported values from: {sources}.\n"
    text += f"\n{len(frame)} rows in `claims.csv` in all (sweeps included), methods: "
    text += ", ".join(sorted(str(method) for method in frame["method"].dropna().unique())) + ".\n\n"
    text += plot(results, "claims_flops.png", "FLOPs vs pixels") + "\n"
    text += plot(results, "claims_memory.png", "training-step memory vs pixels")
    return text


def load_reported(experiments: Path) -> pd.DataFrame:
    """One row per (experiment, reported metric) from experiments/*.yaml, each validated by `load_config`
    (a bad file raises ConfigError naming it and the key)."""
    rows = []
    for path in sorted(experiments.glob("*.yaml")):
        cfg = load_config(path)
        for metric, value in cfg.reported.items():
            rows.append({"experiment": cfg.name, "config": path.name, "dataset": cfg.data.dataset,
                         "metric": metric, "reported": value, "source": cfg.source})
    return pd.DataFrame(rows, columns=["experiment", "config", "dataset", "metric", "reported", "source"])


def section_miou(results: Path, experiments: Path) -> str:
    text = "## Published mIoU rows: reported vs measured\n\n"
    if not experiments.is_dir():
        return text + f"_No experiment folder at `{experiments}`._\n"
    reported = load_reported(experiments)
    reported = reported[reported["metric"].str.startswith("mIoU")]
    if reported.empty:
        return text + f"_No `reported:` mIoU values in `{experiments}/*.yaml`._\n"
    measured = read_csv(results, "miou")
    status = read_csv(results, "experiments")
    table = reported.copy()
    table["measured"] = float("nan")
    table["status"] = ""
    if measured is not None:
        _require(measured, ["experiment", "metric", "measured"], "miou.csv")
        # The latest measurement of each (experiment, metric): the CSV only ever grows.
        latest = measured.drop_duplicates(subset=["experiment", "metric"], keep="last")
        lookup = {(row.experiment, str(row.metric)): row.measured for row in latest.itertuples()}
        table["measured"] = [
            lookup.get((row.experiment, row.metric), float("nan")) for row in table.itertuples()
        ]
    if status is not None:
        _require(status, ["experiment", "status"], "experiments_status.csv")
        by_name = dict(zip(status["experiment"], status["status"], strict=True))
        table["status"] = [by_name.get(name, "not run") for name in table["experiment"]]
    else:
        table["status"] = "not run (no experiments_status.csv)"
    table["status"] = [
        "measured" if not math.isnan(measured_value) else state
        for measured_value, state in zip(table["measured"], table["status"], strict=True)
    ]
    table["delta"] = pd.to_numeric(table["measured"], errors="coerce") - pd.to_numeric(
        table["reported"], errors="coerce"
    )
    columns = ["experiment", "dataset", "metric", "reported", "measured", "delta", "status", "source"]
    text += markdown_table(table[columns])
    if measured is None:
        text += "\n" + missing("miou")
    return text


def section_synthetic(results: Path) -> str:
    text = "## Synthetic long-range benchmark (R=0/1/2/3 vs non-local)\n\n"
    frame = read_csv(results, "synthetic")
    if frame is None:
        return text + missing("synthetic")
    _require(frame, ["variant", "seed", "miou", "object_accuracy", "params", "flops", "peak_memory_bytes",
                     "train_time_s", "steps"], "synthetic_ablation.csv")
    text += ("The class of each image's rectangle is given only by the colour of a marker that shares no row "
             "or column with it (`repro/synthetic/data.py`); the model's receptive field before plus after "
             "attention is within that gap, so one criss-cross pass cannot carry the answer and two can.\n\n")
    summary = frame.groupby(["variant", "steps"], sort=False).agg(
        seeds=("seed", "nunique"), miou_mean=("miou", "mean"), miou_min=("miou", "min"),
        miou_max=("miou", "max"), object_accuracy_mean=("object_accuracy", "mean"),
        params=("params", "first"), forward_gflops=("flops", "first"),
        peak_train_step_mib=("peak_memory_bytes", "first"), train_time_s_mean=("train_time_s", "mean"),
    ).reset_index()
    summary["forward_gflops"] = summary["forward_gflops"] / 1e9
    summary["peak_train_step_mib"] = summary["peak_train_step_mib"] / 2**20
    text += markdown_table(summary) + "\n"
    methods = []
    for column in ("flops_method", "memory_method", "device", "threads"):
        if column in frame.columns:
            values = ", ".join(str(value) for value in frame[column].dropna().unique())
            methods.append(f"{column.replace('_', ' ')}: {values}")
    if methods:
        text += "; ".join(methods) + ".\n\n"
    text += plot(results, "synthetic_ablation.png", "synthetic ablation") + "\n"
    text += "### Attention reach\n\n"
    reach = read_csv(results, "reach")
    text += missing("reach") if reach is None else markdown_table(reach)
    text += "\n" + plot(results, "attention_reach.png", "attention after R=1 and R=2") + "\n"
    text += "<details><summary>Every run</summary>\n\n" + markdown_table(frame) + "\n</details>\n"
    return text


def section_ops_bench(results: Path) -> str:
    text = "## Operator benchmark\n\n"
    frame = read_csv(results, "ops_bench")
    return text + (missing("ops_bench") if frame is None else markdown_table(frame))


def section_efficiency(results: Path) -> str:
    text = "## Whole-model efficiency per config\n\n"
    frame = read_csv(results, "efficiency")
    if frame is None:
        return text + missing("efficiency")
    _require(frame, ["experiment", "metric", "value", "unit", "reported", "method"], "model_efficiency.csv")
    frame = frame.copy()
    reported = pd.to_numeric(frame["reported"], errors="coerce")
    frame["measured/reported"] = pd.to_numeric(frame["value"], errors="coerce") / reported
    with_reported = frame[reported.notna()]
    if not with_reported.empty:
        text += "Rows with a reported value (mmsegmentation's table):\n\n"
        text += markdown_table(with_reported) + "\n"
    text += "<details><summary>Every row</summary>\n\n" + markdown_table(frame) + "\n</details>\n"
    return text


def section_gpu_acceptance(results: Path) -> str:
    """The GPU acceptance run (`repro.pipeline.gpu`): failed checks first, then every row."""
    text = "## GPU acceptance\n\n"
    frame = read_csv(results, "gpu")
    if frame is None:
        return text + "Nothing has been measured on a GPU yet. " + missing("gpu")
    _require(frame, ["step", "check", "metric", "value", "unit", "status", "device"], "gpu_acceptance.csv")
    failed = frame[frame["status"].astype(str).str.startswith("FAILED")]
    devices = ", ".join(sorted(str(device) for device in frame["device"].dropna().unique()))
    text += f"{len(frame)} rows on {devices}; {len(failed)} failed.\n\n"
    if not failed.empty:
        text += "Failed:\n\n" + markdown_table(failed) + "\n"
    return text + "<details><summary>Every row</summary>\n\n" + markdown_table(frame) + "\n</details>\n"


def build_report(results: Path, experiments: Path) -> str:
    """The whole REPORT.md text."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# CCNet reproduction report\n",
        f"Generated by `python -m repro.report` on {now} from the CSVs in `{results}` and the `reported:` "
        f"values of `{experiments}/*.yaml`; nothing in it is typed by hand.\n",
        section_environment(results),
        section_pipeline(results),
        section_claims(results),
        section_synthetic(results),
        section_miou(results, experiments),
        section_efficiency(results),
        section_ops_bench(results),
        section_gpu_acceptance(results),
    ]
    return "\n".join(parts)


def write_report(results: Path, experiments: Path) -> Path:
    if not results.is_dir():
        raise FileNotFoundError(f"results folder {results} does not exist; run `python -m repro.reproduce`")
    text = build_report(results, experiments)
    return atomic_write_text(results / REPORT_NAME, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.report", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--experiments", type=Path, default=Path("experiments"))
    args = parser.parse_args(argv)
    path = write_report(args.results, args.experiments)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
