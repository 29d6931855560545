"""`repro.report` on small hand-made CSVs: every section, missing files, bad inputs."""

import re
from pathlib import Path

import pandas as pd
import pytest

from repro.engine.provenance import LEGACY_RESULT_COLUMNS, RESULT_COLUMNS
from repro.pipeline.report import (
    FINDINGS_END,
    FINDINGS_START,
    build_report,
    load_reported,
    main,
    markdown_table,
    write_report,
)
from tests.configs import write_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS, EXPERIMENTS = ROOT / "results", ROOT / "experiments"


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def _result_row(**changes):
    """A complete results/miou.csv row of city_r2 (the provenance format), with `changes`."""
    row = {column: "" for column in RESULT_COLUMNS}
    row.update(experiment="city_r2", dataset="cityscapes", backbone="R-101-D8", crop="769x769", schedule="60000it",
               metric="mIoU", reported=79.8, measured=79.5, seed=0, eval_mode="whole", eval_scales="1",
               eval_flip="false", eval_average="none", engine="torch", precision="fp32", images_evaluated=500,
               images_in_split=500, iterations_trained=60000, iterations_config=60000, smoke="false",
               complete="true", checkpoint="runs/city_r2/checkpoint_last.pt", device="cpu", date="d")
    row.update(changes)
    return row


@pytest.fixture
def results(tmp_path):
    out = tmp_path / "results"
    _write(
        out / "environment.csv", [{"fact": "torch", "value": "9.9.9"}, {"fact": "device", "value": "cpu (x)"}]
    )
    _write(
        out / "claims.csv",
        [
            {
                "claim": "flops",
                "variant": "cca_naive",
                "recurrence": 2,
                "batch": 1,
                "channels": 512,
                "qk_channels": 64,
                "height": 97,
                "width": 97,
                "metric": "flops",
                "value": 16.54,
                "unit": "GFLOP",
                "reported_value": 16.5,
                "source": "paper",
                "method": "fvcore",
                "device": "cpu",
            },
            {
                "claim": "flops",
                "variant": "cca_naive",
                "recurrence": 2,
                "batch": 1,
                "channels": 512,
                "qk_channels": 64,
                "height": 33,
                "width": 33,
                "metric": "flops",
                "value": 0.7,
                "unit": "GFLOP",
                "reported_value": None,
                "source": "",
                "method": "fvcore",
                "device": "cpu",
            },
            *(
                {
                    "claim": "flops", "variant": variant, "recurrence": recurrence, "batch": 1, "channels": 512,
                    "qk_channels": 64, "height": 97, "width": 97, "metric": metric, "value": value, "unit": unit,
                    "reported_value": reported, "source": "paper", "method": "analytic ops.cost", "device": "any",
                }
                for variant, recurrence, metric, value, unit, reported in (
                    ("non_local_naive", 1, "flops", 108.15, "GFLOP", 108.0),
                    ("cca_naive_r2_vs_non_local_naive", 2, "flop_reduction", 0.847, "fraction", 0.85),
                )
            ),
        ],
    )
    _write(
        out / "synthetic_ablation.csv",
        [
            {
                "variant": variant,
                "recurrence": recurrence,
                "seed": seed,
                "miou": miou,
                "object_accuracy": acc,
                "params": 1000,
                "flops": 2_000_000,
                "flops_method": "counter",
                "peak_memory_bytes": 2**20,
                "memory_method": "profiler",
                "train_time_s": 1.5,
                "steps": 600,
                "batch": 32,
                "train_images": 10,
                "device": "cpu",
                "threads": 1,
                "date": "2026-01-01T00:00:00Z",
            }
            for variant, recurrence, miou, acc in (("R1", 1, 0.31, 0.25), ("R2", 2, 0.99, 1.0))
            for seed in (0, 1)
        ],
    )
    _write(out / "miou.csv", [_result_row(measured=70.0, date="d"), _result_row(measured=79.5, date="d2")])
    _write(
        out / "experiments_status.csv",
        [
            {
                "experiment": "city_r2",
                "config": "city_r2.yaml",
                "status": "measured",
                "detail": "",
                "date": "d",
            },
            {
                "experiment": "ade_r2",
                "config": "ade_r2.yaml",
                "status": "dataset not present",
                "detail": "",
                "date": "d",
            },
        ],
    )
    _write(
        out / "model_efficiency.csv",
        [
            {
                "experiment": "ade_r2",
                "metric": "train_memory_peak",
                "value": 10.0,
                "unit": "GiB",
                "reported": 12.5,
                "method": "FakeTensorMode + MemTracker estimate",
                "device": "traced",
                "date": "d",
            },
        ],
    )
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    write_config(experiments, "city_r2", reported={"mIoU": 79.8, "mIoU_ms_flip": 81.3})
    write_config(experiments, "ade_r2", base="mmseg_ade20k_r50_d8_512x512_80k", reported={"mIoU": 45.2, "fps": 9.0})
    return out, experiments


def test_markdown_table_formats_and_escapes():
    table = markdown_table(pd.DataFrame({"a": [1.234567, None], "b": ["x|y", "z"]}))
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.235 | x\\|y |", "|  | z |"]
    assert markdown_table(pd.DataFrame(columns=["a"])) == "_(no rows)_\n"


def test_report_has_every_section_from_the_csvs(results):
    out, experiments = results
    pages = {}
    text = build_report(out, experiments, pages)
    assert "9.9.9" in text  # environment
    assert "16.54" in text and "1.002" in text  # claim measured and measured/reported
    assert "4 rows in `claims.csv`" in text
    # Latest measurement wins; measured rows are listed, the others collapse into one line per status.
    city = next(line for line in text.splitlines() if line.startswith("| city_r2 | cityscapes | mIoU |"))
    assert "79.5" in city and "-0.3" in city
    assert "- 1 row: dataset not present here; run `python -m repro.run CONFIG`" in text
    assert "| ade_r2 | ade20k | mIoU |" not in text
    miou_page = pages["miou.md"]
    ade = next(line for line in miou_page.splitlines() if line.startswith("| ade_r2 | ade20k | mIoU |"))
    assert "45.2" in ade and "dataset not present" in ade
    flip = next(line for line in miou_page.splitlines() if "mIoU_ms_flip" in line)
    assert "81.3" in flip and "not run" not in flip
    # Synthetic summary: mean over two seeds per variant.
    r2 = next(line for line in text.splitlines() if line.startswith("| R2 | 600 |"))
    assert "| 2 | 0.99 |" in r2
    assert "0.8" in next(line for line in text.splitlines() if line.startswith("| ade_r2 | 10 | GiB | 12.5"))
    # Sections without their CSV name the command that produces them.
    assert "`ops_bench.csv` not found: produce it with `python -m repro.bench`" in text
    assert "`attention_reach.csv` not found" in text
    assert "Plot `plots/synthetic_ablation.png` not found" in text
    # Long tables go to linked detail pages.
    for name in ("claims.md", "synthetic.md", "miou.md", "model_efficiency.md"):
        assert f"(details/{name})" in text and name in pages


def verdict_table(text: str) -> list[str]:
    """The rows of the first section's table, which must be the findings."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("## "))
    assert lines[start] == "## Findings"
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert table[0] == "| claim | the source says | measured here | how | verdict |"
    return table[2:]


def test_report_opens_with_the_verdict_table(results):
    out, experiments = results
    rows = verdict_table(build_report(out, experiments))
    verdicts = [row.rsplit("|", 2)[-2].strip() for row in rows]
    assert len(rows) >= 6
    assert all(v.startswith(("reproduced", "not reproduced", "not measurable here")) for v in verdicts), verdicts
    assert next(row for row in rows if "FLOPs" in row).endswith("| reproduced (within 5%) |")  # 16.54 vs 16.5
    assert "| reproduced |" in next(row for row in rows if "Two criss-cross loops" in row)  # R1 0.25, R2 1.0
    assert "reproduced (1/1 measured)" in next(row for row in rows if "Published mIoU" in row)
    assert "not measurable here: no GPU" in next(row for row in rows if "speed" in row)


def test_verdicts_follow_the_numbers(results):
    out, experiments = results
    claims = pd.read_csv(out / "claims.csv")
    claims.loc[0, "value"] = 20.0  # 21% off the paper's 16.5
    claims.to_csv(out / "claims.csv", index=False)
    miou = pd.read_csv(out / "miou.csv")
    miou.loc[1, "measured"] = 70.0
    miou.to_csv(out / "miou.csv", index=False)
    rows = verdict_table(build_report(out, experiments))
    assert "not reproduced (beyond 5%)" in next(row for row in rows if "FLOPs" in row)
    assert "not reproduced (0/1 measured)" in next(row for row in rows if "Published mIoU" in row)


def test_write_report_writes_details_and_the_readme_block(results, tmp_path):
    out, experiments = results
    readme = out.parent / "README.md"
    readme.write_text(f"# x\n\n{FINDINGS_START}\nold\n{FINDINGS_END}\n\nrest\n")
    (out / "details").mkdir()
    (out / "details" / "stale.md").write_text("from an earlier report")
    write_report(out, experiments)
    assert (out / "details" / "claims.md").read_text().startswith("# Every claims row")
    assert not (out / "details" / "stale.md").exists()
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{FINDINGS_END}\n\nrest\n")
    block = text[text.index(FINDINGS_START):text.index(FINDINGS_END)]
    assert "**Criss-cross (R=2) needs ~85% fewer FLOPs than a non-local block**: reproduced" in block
    assert "results/REPORT.md" in block
    # A README without the markers is left alone.
    other = tmp_path / "OTHER.md"
    other.write_text("no markers\n")
    write_report(out, experiments, readme=other)
    assert other.read_text() == "no markers\n"


def test_committed_report_is_short_with_the_verdicts_first():
    """The real results: REPORT.md under 34 KB (30 KB before the parity, deployment and kernel-floor sections;
    their long tables are on detail pages), verdict table first; detail pages hold the long tables."""
    pages = {}
    text = build_report(RESULTS, EXPERIMENTS, pages)
    assert len(text.encode()) < 34_000
    assert text.index("## Findings") < text.index("## ", text.index("## Findings") + 3)
    assert "| claim | the source says | measured here | how | verdict |" in text
    assert sum(len(page) for page in pages.values()) > len(text)  # the long tables are elsewhere


def test_report_embeds_existing_plots(results):
    out, experiments = results
    (out / "plots").mkdir()
    (out / "plots" / "synthetic_ablation.png").write_bytes(b"png")
    assert "![synthetic ablation](plots/synthetic_ablation.png)" in build_report(out, experiments)


def test_kernel_section_lists_each_goal_from_the_counts(tmp_path):
    from repro.measure.kernels import backward_floor_bytes, floors, forward_floor_bytes

    base = {"kernel": "all", "layout": "channels_last", "batch": 1, "qk_channels": 64, "v_channels": 512,
            "height": 97, "width": 97, "sector_ratio": 1.0, "macs_ratio": 1.0, "dtype": "bf16"}
    macs = floors({**base, "pass": "forward", "target": "sm_90"})["macs"]
    forward = forward_floor_bytes(1, 64, 512, 97, 97, 2)
    backward = int(1.05 * backward_floor_bytes(1, 64, 512, 97, 97, 2, (1, 1)))
    _write(tmp_path / "kernel_model.csv", [
        {**base, "pass": "forward", "useful_ratio": 2.45, "useful_bytes": forward, "sector_bytes": forward,
         "macs": macs},
        {**base, "pass": "backward", "useful_ratio": 3.09, "useful_bytes": backward, "sector_bytes": backward,
         "macs": macs},
    ])
    pages = {}
    text = build_report(tmp_path, tmp_path / "nothing", pages)
    section = text[text.index("## Triton kernel"):text.index("## GPU status")]
    assert "| forward bytes over the two-pass floor | bf16 | counted sm_90 | <= 1.02 | 1 | 1 | True |" in section
    assert "| backward bytes over the line-tile floor | bf16 | counted sm_90 | <= 1.02 | 1.05 | 1 | False |" in section
    whole_lines = ("| backward bytes over the minimum (128-wide tiles) | bf16 | counted sm_90 | <= 3 | 3.09 | 1 "
                   "| False |")
    assert whole_lines in section
    assert "`kernel_resources.csv` not found" in section and "kernel_model.md" in pages
    assert "on sm_90 (H100 / H200) (rows" in section
    # The floors, derived from the formulas, on their detail page (linked), and no L2 table without the model's
    # columns.
    floors_page = pages["kernel_floors.md"]
    assert "kernel_floors.md" in section
    assert "**Forward bytes, two passes: s (4 Cqk + 5 Cv) + 12 per pixel = 2.445x the minimum**" in floors_page
    assert "fp32 (tf32x3 dots spill above 32-wide tiles, n = 4): 9.05x" in floors_page
    assert "L2 view" not in floors_page
    # Rows counted with the A100's tiles: goal rows of their own, named in the text; the L2 model's rows shown.
    sm_80 = {**base, "pass": "forward", "useful_ratio": 3.5, "useful_bytes": int(1.5 * forward),
             "sector_bytes": int(1.5 * forward), "macs": macs, "target": "sm_80", "minimum_bytes": 100,
             "l2_model_dram_bytes": 120, "l2_model_dram_ratio": 1.2}
    _write(tmp_path / "kernel_model.csv", [
        {**base, "pass": "forward", "useful_ratio": 2.45, "useful_bytes": forward, "sector_bytes": forward,
         "macs": macs, "target": "sm_90", "minimum_bytes": 100},
        sm_80,
    ])
    pages = {}
    text = build_report(tmp_path, tmp_path / "nothing", pages)
    section = text[text.index("## Triton kernel"):text.index("## GPU status")]
    assert "on sm_90 (H100 / H200) and on sm_80 (A100)" in section
    assert "| forward bytes over the two-pass floor | bf16 | counted sm_80 | <= 1.02 | 1.5 | 1 | False |" in section
    assert "L2 view, a **model, not a measurement**: the interpreter's address trace" in pages["kernel_floors.md"]
    assert "| forward | bf16 | channels_last | sm_80 | 1 | 100 |" in pages["kernel_floors.md"]


def test_report_with_no_csvs_says_how_to_make_each(tmp_path):
    text = build_report(tmp_path, tmp_path / "nothing")
    for name in ("claims.csv", "synthetic_ablation.csv", "model_efficiency.csv", "environment.csv",
                 "kernel_model.csv"):
        assert f"`{name}` not found" in text
    assert "No experiment folder" in text


def test_main_writes_report_file(results):
    out, experiments = results
    assert main(["--results", str(out), "--experiments", str(experiments)]) == 0
    assert (out / "REPORT.md").read_text().startswith("# CCNet reproduction report")
    assert not list(out.glob(".REPORT.md.*"))


def test_missing_results_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "absent", tmp_path)


def test_bad_inputs_name_the_file(results, tmp_path):
    out, experiments = results
    bad = write_config(experiments, "bad")
    bad.write_text(bad.read_text().replace("reported:\n  mIoU: 79.74", "reported: [79.8]"))
    with pytest.raises(ValueError, match="bad.yaml: reported"):
        load_reported(experiments)
    (experiments / "bad.yaml").unlink()
    pd.DataFrame({"claim": ["x"]}).to_csv(out / "claims.csv", index=False)
    with pytest.raises(ValueError, match="claims.csv lacks columns"):
        build_report(out, experiments)


def test_gpu_acceptance_lists_failed_checks_and_the_kernel_goals(tmp_path):
    base = {"variant": "cca_triton", "dtype": "bf16", "shape": "8x64x512x97x97", "unit": "x", "method": "m",
            "device": "cuda: NVIDIA H200", "date": "2026-12-01"}
    _write(tmp_path / "gpu_acceptance.csv", [
        {**base, "step": "goals", "check": "fwd+bwd speedup over cca_naive", "metric": "speedup", "value": 7.5,
         "status": "goal met (>= 5)"},
        {**base, "step": "goals", "check": "backward peak memory", "metric": "peak_memory_ratio", "value": 1.56,
         "status": "goal not met (<= 1.1)"},
        {**base, "step": "kernels", "check": "determinism", "metric": "bitwise_equal_runs", "value": 0,
         "status": "FAILED: two forward + backward runs differ"},
    ])
    pages = {}
    text = build_report(tmp_path, tmp_path / "nothing", pages)
    section = text[text.index("### GPU acceptance"):]
    assert "3 rows on cuda: NVIDIA H200; 1 failed." in section
    assert "| fwd+bwd speedup over cca_naive | bf16 | 8x64x512x97x97 | 7.5 | x | goal met (>= 5) |" in section
    assert "goal not met (<= 1.1)" in section and "gpu_acceptance.md" in pages


def test_only_complete_rows_count_the_others_are_listed_apart(results):
    out, experiments = results
    rows = [
        _result_row(measured=79.0, seed=0),
        _result_row(measured=80.0, seed=1),
        _result_row(measured=81.0, seed=2),
        _result_row(measured=1.06, smoke="true", complete="false", iterations_trained=2, iterations_config=2,
                    images_evaluated=1, images_in_split=2, overrides="smoke (shrunk model, generated data)"),
        _result_row(measured=41.78, complete="false", images_evaluated=2, images_in_split=500),
        _result_row(measured=60.0, complete="false", overrides="data.root=/d; train.lr=0.02"),
        _result_row(measured=50.0, complete="false", iterations_trained=1000),
    ]
    _write(out / "miou.csv", rows)
    pages = {}
    text = build_report(out, experiments, pages)
    # Mean +- sample std over three seeds beside the published value; the verdict counts it once.
    city = next(line for line in text.splitlines() if line.startswith("| city_r2 | cityscapes | mIoU |"))
    assert "| 80.00 ± 1.00 |" in city and "| 0 1 2 |" in city and "79.8" in city
    assert "reproduced (1/1 measured)" in next(row for row in verdict_table(text) if "Published mIoU" in row)
    assert "4 row(s) of `miou.csv` do not count (smoke: 1, partial evaluation: 1, overridden: 1, " in text
    page = pages["miou_not_counted.md"]
    for kind in ("| smoke |", "partial evaluation (2 of 500 images)", "overridden (train.lr=0.02)",
                 "partial training (1000 of 60000 iterations)"):
        assert kind in page, kind
    # With only rows that do not count, nothing is measured: the smoke run no longer rewrites the verdict.
    _write(out / "miou.csv", rows[3:])
    rows = verdict_table(build_report(out, experiments))
    assert "not measurable here" in next(row for row in rows if "Published mIoU" in row)


def test_old_format_rows_are_read_and_never_counted(results):
    out, experiments = results
    pd.DataFrame([{"experiment": "city_r2", "dataset": "cityscapes", "backbone": "R-101-D8", "crop": "769",
                   "schedule": "80000it", "metric": "mIoU", "reported": 79.8, "measured": 79.5, "delta": -0.3,
                   "checkpoint": "", "device": "cpu", "date": "d"}],
                 columns=list(LEGACY_RESULT_COLUMNS)).to_csv(out / "miou.csv", index=False)
    pages = {}
    text = build_report(out, experiments, pages)
    assert "old format (no provenance): 1" in text and "old format (no provenance)" in pages["miou_not_counted.md"]
    assert "not measurable here" in next(row for row in verdict_table(text) if "Published mIoU" in row)


def test_drift_kept_when_nothing_new_and_date_alone_rewrites_nothing(results, capsys):
    out, experiments = results
    (out / "REPORT.md").write_text("# old\n\n## This run vs the committed results\n\nkept comparison\n\n## Next\n")
    (out / "details").mkdir()
    (out / "details" / "drift.md").write_text("# Every compared value\n\nkept page\n")
    write_report(out, experiments)
    text = (out / "REPORT.md").read_text()
    assert "## This run vs the committed results\n\nkept comparison\n\n## Module efficiency" in text
    assert (out / "details" / "drift.md").read_text() == "# Every compared value\n\nkept page\n"
    # Regenerated minutes later: only the date would change, so nothing is written.
    old_date = re.sub(r"on [0-9-]+ [0-9:]+ UTC", "on 1999-01-01 00:00 UTC", text, count=1)
    assert old_date != text
    (out / "REPORT.md").write_text(old_date)
    before = (out / "REPORT.md").read_text()
    assert main(["--results", str(out), "--experiments", str(experiments), "--readme", str(out / "none.md")]) == 0
    assert (out / "REPORT.md").read_text() == before and "nothing changed" in capsys.readouterr().out


def test_runs_option_draws_curves_and_tables(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    run.mkdir()
    records = [{"event": "start", "step": 0, "experiment": "x"}]
    records += [{"event": "train", "step": s, "loss": 2.0 / s, "lr": 0.01 / s, "experiment": "x"} for s in (1, 2, 3, 4)]
    records += [{"event": "val", "step": 2, "mIoU": 12.5, "pixel_accuracy": 50.0, "class_names": ["road", "sky"],
                 "iou_per_class": [20.0, None]}]
    records += [{"event": "eval", "metric": "mIoU", "mIoU": 15.0, "step": 4, "images": 3}]
    (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run / "iou_per_class.csv").write_text("class_id,class,mIoU_iou\n0,road,20.0\n1,sky,\n")
    assert main(["--runs", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 0
    summary = (run / "summary.md").read_text()
    assert "| 2 | 12.5 | 50 |" in summary and "| road | 20 |" in summary and "| 1 | sky |  |" in summary
    assert "![training curves](curves.png)" in summary
    assert main(["--runs", str(tmp_path / "missing")]) == 4
    assert "no train_log.jsonl" in capsys.readouterr().err
