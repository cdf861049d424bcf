"""`stoa-vlp config`: a config as YAML with each key's comments from config.py, read back unchanged."""

from __future__ import annotations

import pytest

from stoa_vlp.cli import main
from stoa_vlp.config import Config, ConfigError, load_config
from stoa_vlp.config_comments import commented_yaml, field_comments


def test_every_setting_says_what_it_means():
    comments = field_comments()
    keys = [f"{section}.{key}" for section, values in Config().to_dict().items() for key in values]
    assert sorted(comments) == sorted(keys)
    unexplained = [key for key, comment in comments.items() if not (comment.beside or comment.above)]
    assert unexplained == []


def test_comments_stand_beside_and_above_their_keys():
    lines = commented_yaml(load_config("base")).splitlines()
    assert "  frames: 12  # T, frames per clip" in lines
    assert lines[lines.index("  text_width: 512  # text transformer width, also the fusion encoder's") - 1] == "  # CLIP text tower"
    low_precision = lines.index("  low_precision_residual: false")
    assert lines[low_precision - 2].startswith("  # under autocast, keep the video tower's residual stream")
    assert [line for line in lines if not line.startswith(" ")] == ["model:", "loss:", "data:", "train:", "task:"]


@pytest.mark.parametrize("preset, overrides", [
    ("base", []),
    ("tiny", ['train.output_dir="runs/a #b: c"', "train.betas=[0.8, 0.9]", "train.eps=1.0e-8", 'data.video_root="yes"',
              "task.name=qa", "data.train=''"]),
])
def test_the_yaml_reads_back_as_the_same_config(tmp_path, preset, overrides):
    config = load_config(preset, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(commented_yaml(config))
    assert load_config(str(path)) == config


def test_the_command_prints_the_config_with_its_overrides(capsys):
    assert main(["config", "--config", "tiny", "--set", "model.frames=8"]) == 0
    printed = capsys.readouterr().out
    assert "  frames: 8  # T, frames per clip\n" in printed and printed == commented_yaml(load_config("tiny", ["model.frames=8"]))
    with pytest.raises(ConfigError, match="unknown config key 'model.frame'"):
        main(["config", "--set", "model.frame=8"])
