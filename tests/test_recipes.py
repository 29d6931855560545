"""The "recipe per source" table: built from the experiment configs, one column per source family."""

from __future__ import annotations

from pathlib import Path

from repro.pipeline.recipes import family_of, recipe_table, section_recipes
from repro.pipeline.report import build_report, markdown_table
from tests.configs import write_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_family_of_each_prefix():
    assert family_of("mmseg_ade20k_r50_d8_512x512_80k") == "mmsegmentation"
    assert family_of("ssseg_voc_r50_d8") == "sssegmentation"
    assert family_of("paddleseg_cityscapes_r101_d8_769x769_60k") == "PaddleSeg"
    assert family_of("cityscapes_r2_ohem") == family_of("paper_ablation_r2") == "official repository"


def test_table_shows_where_the_sources_differ():
    table = recipe_table(EXPERIMENTS).set_index("field")
    assert list(table.columns) == [
        "decides", "official repository", "mmsegmentation", "sssegmentation", "PaddleSeg",
    ]
    average = table.loc["train.loss_average"]
    assert (average["official repository"], average["mmsegmentation"], average["sssegmentation"]) == (
        "valid_pixels", "all_pixels", "valid_pixels",
    )
    horizon = table.loc["train.poly_horizon"]
    assert (horizon["official repository"], horizon["mmsegmentation"]) == ("iterations", "iterations_minus_one")
    assert table.loc["model.stem", "sssegmentation"] == "v1c"
    assert table.loc["data.pad_position", "sssegmentation"] == "centre"
    assert table.loc["train.loss", "official repository"] == "ce / ohem"
    # Evaluation protocols (EvalConfig): official tiles zero-padded, IoU 0 kept; mmseg 0.x views of the original.
    assert table.loc["eval.slide_pad", "official repository"] == "zero"
    assert (table.loc["eval.zero_union", "official repository"], table.loc["eval.zero_union", "mmsegmentation"]) == (
        "zero", "drop",
    )
    assert table.loc["eval.ms_resize", "mmsegmentation"] == "cv2_scale_bounds"
    assert table.loc["eval.upsample", "sssegmentation"] == "label_once"
    assert table.loc["eval.val_pad_size", "PaddleSeg"] == "(1025, 2049)"
    assert set(table.loc["data.base_size", "mmsegmentation"].split(" / ")) == {
        "(2048, 512)", "(2048, 1024)", "(2049, 1025)",
    }


def test_columns_follow_the_configs(tmp_path):
    write_config(tmp_path, "mmseg_a", base="mmseg_voc12aug_r50_d8_512x512_20k")
    write_config(tmp_path, "cityscapes_x", base="cityscapes_r2")
    table = recipe_table(tmp_path)
    assert list(table.columns) == ["field", "decides", "official repository", "mmsegmentation"]
    text = section_recipes(tmp_path, table=markdown_table)
    assert text.startswith("## Recipe per source") and "| train.min_lr |" in text
    assert "no experiment configs" in section_recipes(tmp_path / "empty", table=markdown_table)


def test_report_has_the_recipe_section(tmp_path):
    write_config(tmp_path / "experiments", "ssseg_b", base="ssseg_voc_r50_d8")
    results = tmp_path / "results"
    results.mkdir()
    assert "## Recipe per source" in build_report(results, tmp_path / "experiments")
