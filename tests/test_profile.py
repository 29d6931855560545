"""repro.profile on a small CCNet (ResNet-50-D8, 33x33 crop): the fake-mode memory estimate against the real
CPU allocator peak, parameter and FLOP splits against independent sums, the CLI's CSV and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from ops.cost import criss_cross_module_cost
from repro.engine.config import ConfigError, load_config
from repro.measure.flops import fvcore_macs
from repro.measure.profile import (
    COLUMNS,
    build_model,
    counter_flops,
    estimate_training_memory,
    fvcore_flops,
    main,
    measure_training_memory,
    parameter_counts,
    settings_for,
)

TINY = {
    "name": "tiny_r50",
    "source": "test fixture",
    "reported": {"memory_gb": 0.5, "fps": 2.0},
    "model": {"depth": 50, "stem": "deep", "output_stride": 8, "head": "rcca", "recurrence": 2,
              "num_classes": 19, "aux": True, "backend": "naive"},
    "data": {"dataset": "cityscapes", "train_split": "train", "val_split": "val", "crop_size": [33, 33],
             "batch_size": 1, "scale_range": [0.5, 2.0], "mean": [123.675, 116.28, 103.53],
             "std": [58.395, 57.12, 57.375], "channel_order": "rgb", "rescale": "factor", "base_size": None,
             "scale_step": None, "cat_max_ratio": 1.0, "crop_fallback": "none", "photometric_distortion": "none",
             "pad_position": "bottom_right", "pad_fill": "normalised_zero"},
    "train": {"iterations": 10, "lr": 0.01, "weight_decay": 0.0005, "loss": "ce", "source_gpus": 1,
              "min_lr": 0.0, "poly_horizon": "iterations", "loss_average": "valid_pixels"},
    "eval": {"mode": "slide", "crop_size": [33, 33], "stride": [22, 22], "scale": [64, 48], "slide_pad": "none",
             "val_pad_size": None, "val_pad_value": None, "upsample": "input_then_label",
             "resize_align_corners": False, "zero_union": "drop", "ms_flip": False, "ms_scales": [1.0],
             "ms_mode": "slide", "ms_resize": "cv2_scale_bounds", "ms_average": "probs", "ms_average_at": "original"},
}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny_r50.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def cfg(config_path):
    return load_config(config_path)


def test_fake_estimate_matches_cpu_allocator(cfg):
    """Tolerance 1%: on this model the two agree to a few bytes (no conv here allocates scratch outside the
    dispatcher on CPU); a kernel that did would make the estimate a lower bound."""
    estimate = estimate_training_memory(cfg)
    state, peak = measure_training_memory(cfg, device=torch.device("cpu"))
    assert estimate.state_bytes == state
    assert estimate.peak_bytes == pytest.approx(peak, rel=0.01)
    assert estimate.step_bytes > 0


def test_parameter_counts_sum_over_modules(cfg):
    model = build_model(cfg)
    counts = parameter_counts(model)
    assert counts["total"] == counts["backbone"] + counts["decode_head"] + counts["auxiliary_head"]
    direct = sum(p.numel() for module in model.modules() for p in module.parameters(recurse=False))
    assert counts["total"] == direct


def _conv_macs(module: nn.Module, height: int, width: int, *, skip: nn.Module) -> int:
    """MACs of every Conv2d in `module` outside `skip`, all at stride 1 on (height, width)."""
    inside = {id(m) for m in skip.modules()}
    total = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and id(conv) not in inside:
            assert conv.stride == (1, 1)
            kernel = conv.kernel_size[0] * conv.kernel_size[1]
            total += height * width * conv.out_channels * conv.in_channels // conv.groups * kernel
    return total


def test_head_flops_equal_analytic_model_plus_convolutions(cfg):
    model = build_model(cfg)
    head = model.decode_head
    height, width = 5, 7
    torch.manual_seed(0)
    with torch.no_grad():
        count = fvcore_macs(head.eval(), (torch.randn(1, head.in_channels, height, width),))
    attention = criss_cross_module_cost(1, head.channels, head.attention.qk_channels, height, width,
                                        recurrence=cfg.model.recurrence).macs
    assert count.macs == attention + _conv_macs(head, height, width, skip=head.attention)


def test_counters_agree_up_to_the_masked_diagonal(cfg):
    size = settings_for(cfg).inference_size
    counted = counter_flops(cfg, size)
    traced = fvcore_flops(cfg, size)
    assert counted["backbone"] == traced["backbone"]
    assert counted["auxiliary_head"] == traced["auxiliary_head"]
    # Stride 8 of a 33x33 input: 5x5 features. The naive backend computes one masked energy per pixel more.
    model = build_model(cfg)
    extra = 2 * cfg.model.recurrence * 5 * 5 * (model.decode_head.attention.qk_channels + 512)
    assert counted["decode_head"] - traced["decode_head"] == extra


def test_settings_follow_the_config(cfg):
    settings = settings_for(cfg)
    assert settings.image_size == (48, 64)
    assert settings.inference_size == (33, 33)
    assert settings.windows_per_image == 2 * 3


def test_cli_writes_rows_beside_reported_values(config_path, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    pd.DataFrame([{"experiment": "other", "metric": "train_memory_peak", "value": 1.0, "unit": "GiB",
                   "reported": "", "method": "m", "device": "d", "date": "x"}]).to_csv(
        out / "model_efficiency.csv", index=False)
    main([str(config_path), "--out", str(out), "--throughput", "--repeats", "1", "--device", "cpu"])
    frame = pd.read_csv(out / "model_efficiency.csv")
    assert tuple(frame.columns) == COLUMNS
    assert "other" in set(frame.experiment)  # earlier rows are kept
    rows = frame[frame.experiment == "tiny_r50"].set_index("metric")
    assert rows.loc["train_memory_peak", "reported"] == 0.5
    assert rows.loc["train_memory_estimate_over_reported", "value"] == pytest.approx(
        rows.loc["train_memory_peak", "value"] / 0.5)
    assert rows.loc["fps_slide", "value"] > 0 and rows.loc["fps_whole", "value"] > 0
    assert rows.loc["fps_slide", "reported"] == 2.0
    assert rows.loc["flops_per_image", "value"] == pytest.approx(6 * rows.loc["flops_inference", "value"])
    assert frame.method.notna().all()
    section = (out / "model_efficiency.md").read_text()
    estimate = rows.loc["train_memory_peak", "value"]
    crop = "33x33, batch 1, criss-cross backend naive"
    assert f"| tiny_r50 | {crop} | {estimate:.2f} | 0.5 | {estimate / 0.5:.2f} |" in section


def test_cli_errors_on_bad_configs(config_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(tmp_path / "missing.yaml"), "--out", str(tmp_path)])
    bad = dict(TINY, name="bad")
    bad["model"] = dict(TINY["model"], recurence=2)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="recurence"):
        main([str(config_path), str(path), "--out", str(tmp_path)])
    assert not (tmp_path / "model_efficiency.csv").exists()  # nothing profiled before every config loaded


@pytest.mark.slow
def test_r101_769_estimate_does_not_allocate(config_path):
    # In a process of its own, peak RSS read as VmHWM (the peak of the process's own address space): ru_maxrss is a
    # lifetime peak that even survives exec, so a child of a pytest worker that had built a large model read the
    # worker's 5.5 GB.
    script = (
        "import json, resource, sys\n"
        "from repro.engine.config import load_config, with_overrides\n"
        "from repro.measure.profile import estimate_training_memory\n"
        "big = with_overrides(load_config(sys.argv[1]), {'model.depth': 101, 'data.crop_size': (769, 769), "
        "'data.batch_size': 2})\n"
        "estimate = estimate_training_memory(big)\n"
        "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM:')]\n"
        "rss = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps({'estimate': estimate.peak_bytes, 'rss': rss}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(config_path)], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["estimate"] > 8 * 2**30
    assert measured["rss"] < measured["estimate"] / 2
