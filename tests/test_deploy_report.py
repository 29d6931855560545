"""The generated "fast inference on a CPU" and engine-agreement tables (repro.pipeline.deploy_report)."""

from __future__ import annotations

import pandas as pd

from repro.pipeline import deploy_report
from repro.pipeline.report import markdown_table, section_inference


def _bench_rows(cpu="Intel Xeon", threads="1"):
    rows = []
    for variant, engine, precision, median, speedup, agreement in (
        ("torch_eager_vs_engines", "torch", "fp32", 12.0, 1.0, 100.0),
        ("onnxruntime", "onnxruntime", "fp32", 6.0, 2.0, 1.0),
        ("openvino_fp32", "openvino", "fp32", 4.0, 3.0, 1.0),
        ("openvino_default", "openvino", "default (bf16)", 1.0, 12.0, 0.993),
        ("torch_eager", "torch", "fp32", 11.0, 1.0, ""),  # the operator benchmark's row: not ours
    ):
        rows.append({"model": "ccnet_rcca_r2", "backbone": "R-101-D8", "input_hw": "512x1024", "batch": 1,
                     "engine": engine, "precision": precision, "threads": threads, "variant": variant,
                     "median_s": median, "min_s": median, "repeats": 3, "speedup_vs_torch_eager": speedup,
                     "argmax_agreement": agreement, "max_abs_logit_diff": "", "cpu": cpu, "device": f"cpu: {cpu}",
                     "torch": "2.13", "date": "d", "commit": "c"})
    return rows


def test_fast_inference_table_from_the_csv(tmp_path):
    pd.DataFrame(_bench_rows() + _bench_rows(threads="2")[:2]).to_csv(tmp_path / "inference_bench.csv", index=False)
    table = deploy_report.fast_inference_table(tmp_path)
    assert list(table["threads"]) == ["1", "2"]
    first = table.iloc[0]
    assert first["torch eager fp32"] == "12.00 s (1.0x)"
    assert first["OpenVINO default"] == "1.00 s (12.0x)"
    assert first["OpenVINO default: precision, agreement"] == "default (bf16), 99.30%"
    assert table.iloc[1]["OpenVINO fp32"] == "not run"  # the 2-thread case measured only ONNX Runtime
    assert set(table["other processes"]) == {"not recorded"}  # rows from before the column existed
    block = deploy_report.inference_block(tmp_path, markdown_table)
    assert "| Intel Xeon | CCNet R-101-D8 | 512x1024 | 1 |" in block
    assert "python -m repro.export --agreement" in block  # export.csv absent: says how to make it


def test_missing_csvs_say_which_command_makes_them(tmp_path):
    assert deploy_report.fast_inference_table(tmp_path) is None
    text = section_inference(tmp_path)
    assert "python -m repro.bench --inference" in text and "python -m repro.export --agreement" in text


def test_agreement_table_and_readme_block(tmp_path):
    from repro.pipeline.deploy import COLUMNS

    row = dict.fromkeys(COLUMNS, "")
    row.update(model="synthetic R2", engine="openvino", precision="bf16", argmax_agreement="99.75",
               verdict="pass")
    pd.DataFrame([row]).to_csv(tmp_path / "export.csv", index=False)
    table = deploy_report.agreement_table(tmp_path)
    assert table.iloc[0]["argmax agreement %"] == "99.75" and table.iloc[0]["verdict"] == "pass"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{deploy_report.INFERENCE_START}\nold\n{deploy_report.INFERENCE_END}\nend\n")
    block = deploy_report.inference_block(tmp_path, markdown_table)
    assert deploy_report.update_inference_block(readme, block)
    text = readme.read_text()
    assert "old" not in text and "synthetic R2" in text and text.startswith("intro") and text.endswith("end\n")
    assert not deploy_report.update_inference_block(tmp_path / "none.md", block)


def test_other_processes_share_is_shown_per_case(tmp_path):
    rows = [{**row, "other_cpu_share": 0.0042} for row in _bench_rows()]
    rows += [{**row, "other_cpu_share": 0.31} for row in _bench_rows(threads="2")]
    pd.DataFrame(rows).to_csv(tmp_path / "inference_bench.csv", index=False)
    table = deploy_report.fast_inference_table(tmp_path)
    assert list(table["other processes"]) == ["0.4%", "31.0%"]
    block = deploy_report.inference_block(tmp_path, markdown_table)
    assert deploy_report.OTHER_PROCESSES_NOTE in block and "above 5%" in block
