import re

import pytest

from stoa_vlp.config import Config, ConfigError, load_config, parse_override, path_override, save_config


def test_presets_load_and_differ():
    tiny = load_config("tiny")
    base = load_config("base")
    assert (tiny.model.vision_layers, tiny.model.frames, tiny.model.image_size) == (2, 4, 64)
    assert (base.model.vision_width, base.model.frames, base.model.boxes_per_frame) == (768, 12, 10)
    assert (base.model.trajectories, base.model.action_queries, base.model.fusion_layers) == (20, 4, 6)
    assert base.model.text_len == 32


def test_dotted_overrides_are_typed():
    config = load_config("tiny", ["model.frames=8", "loss.vtc=0", "train.betas=[0.9, 0.95]", "model.objects=false"])
    assert config.model.frames == 8
    assert config.loss.vtc == 0.0 and isinstance(config.loss.vtc, float)
    assert config.train.betas == (0.9, 0.95)
    assert config.model.objects is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.framez=8", "unknown config key 'model.framez'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("model.frames=eight", "model.frames: expected an integer"),
        ("model.frames=2.5", "model.frames: expected an integer"),
        ("model.objects=3", "model.objects: expected true/false"),
        ("train.betas=[0.9]", "train.betas: expected a list of 2 values"),
        ("model=3", "model: expected a mapping"),
        ("model.frames", "not of the form"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("tiny", [override])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    config = load_config("tiny", ["train.lr=3e-4"])
    assert config.train.lr == 3e-4
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  lr: 1e-5\n")
    assert load_config(str(path)).train.lr == 1e-5
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config("tiny", ["train.lr=fast"])


def test_override_errors_name_the_override_not_the_preset():
    with pytest.raises(ConfigError, match=r"^override 'model.frames=x': model.frames: expected an integer"):
        load_config("tiny", ["model.frames=x"])


def test_unknown_preset_and_yaml_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.widht'"):
        load_config(str(path))


def test_save_round_trip(tmp_path):
    config = load_config("tiny", ["model.frames=6", "train.lr=0.5"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == config


def test_parse_override_nests(tmp_path):
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(str(empty)) == Config()


def test_yaml_syntax_errors_name_the_file_or_the_override(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  frames: [4\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line 3, column 1: expected ',' or ']'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^override 'model.frames=\[1': invalid YAML at line 1"):
        load_config("tiny", ["model.frames=[1"])
    path.write_bytes(b"model:\n  frames: 4 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: 'utf-8' codec can't decode byte 0xe9"):
        load_config(str(path))


def test_a_key_given_twice_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  frames: 4\n  image_size: 64\n  frames: 8\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: invalid YAML at line 4, column 3: duplicate key 'frames'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^override 'model=\{frames: 4, frames: 8\}': .*duplicate key 'frames'"):
        load_config("tiny", ["model={frames: 4, frames: 8}"])
    path.write_text("base: &base {frames: 4}\nmodel:\n  <<: *base\n  image_size: 64\n")  # merge keys are not repeats
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.frames=0", "model.frames must be at least 1, got 0"),
        ("model.frames=-1", "model.frames must be at least 1, got -1"),
        ("model.image_size=0", "model.image_size must be at least 1, got 0"),
        ("model.patch_size=0", "model.patch_size must be at least 1, got 0"),
        ("model.text_len=1", "model.text_len must be at least 2, got 1"),
        ("data.batch_size=0", "data.batch_size must be at least 1, got 0"),
        ("data.num_workers=-1", "data.num_workers must be at least 0, got -1"),
        ("train.lr=-1", "train.lr must be at least 0, got -1.0"),
        ("train.lr=.nan", "train.lr must be at least 0, got nan"),
        ("train.warmup_steps=-5", "train.warmup_steps must be at least 0, got -5"),
        ("data.max_bad_samples=-0.5", "data.max_bad_samples must be at least 0, got -0.5"),
        ("data.max_bad_samples=.nan", "data.max_bad_samples must be at least 0, got nan"),
        ("train.warmup_share=1", "train.warmup_share must be below 1, got 1.0"),
    ],
)
def test_values_out_of_range_name_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^override '{re.escape(override)}': {message}$"):
        load_config("tiny", [override])


def test_values_out_of_range_in_a_file_or_a_dict_name_their_source(tmp_path):
    from stoa_vlp.config import from_dict

    path = tmp_path / "zero.yaml"
    path.write_text("data:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"zero.yaml: data.batch_size must be at least 1, got 0$"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^run/state.json: model.frames must be at least 1, got 0$"):
        from_dict({"model": {"frames": 0}}, "run/state.json")


def test_a_config_file_without_an_extension_is_read_as_a_file(tmp_path, monkeypatch):
    path = tmp_path / "config_backup"  # was taken for the name of a preset
    path.write_text("model:\n  frames: 3\n")
    assert load_config(str(path)).model.frames == 3
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").write_text("model:\n  frames: 3\n")  # a preset's name still names the preset
    assert load_config("base").model.frames == 12


@pytest.mark.parametrize("path", ["world/dets #2.jsonl", "world/dets: v2.jsonl", "a 'quoted' \"path\".jsonl", "",
                                  "runs/demo-\U0001F389/dets.jsonl", "C:\\data\\caf\u00e9\tx.jsonl"])
def test_a_path_given_to_a_command_reads_back_as_itself(path):
    """Commands pass paths (--detections, the demo's folders) as overrides, read as YAML: a ' #' cut the
    path off and a ': ' made it a mapping."""
    assert load_config("tiny", [path_override("data.detections", path)]).data.detections == path


def test_settings_that_would_fail_after_the_run_started_fail_before_it():
    from stoa_vlp.commands.common import check_settings

    for override, message in [("data.eval_sampling=centre", "data.eval_sampling must be one of uniform, rand"),
                              ("data.train_sampling=random", "data.train_sampling must be one of uniform, rand"),
                              ("model.text_len=64", "the fusion sequence takes 75 positions")]:
        with pytest.raises(ValueError, match=message):
            check_settings(load_config("tiny", [override]))
    for preset in ("tiny", "base"):
        check_settings(load_config(preset))


def test_the_fusion_length_counts_an_answer_slot_for_video_qa_only():
    from stoa_vlp.model import STOAVLP
    from stoa_vlp.tasks.pipeline import task_config

    exact = load_config("tiny", ["model.fusion_positions=35"])  # 4 frames + 1 + 4 + 2 + 24 tokens
    STOAVLP(exact.model)  # a model whose sequence fills the table exactly
    task_config(exact, "captioning")
    with pytest.raises(ValueError, match="video QA adds an answer slot: the fusion sequence takes 36 positions"):
        task_config(exact, "qa")


def test_answer_checks_the_answer_slot_before_loading_anything(tmp_path):
    from stoa_vlp.tasks.pipeline import check_qa_fusion

    check_qa_fusion(load_config("tiny", ["model.fusion_positions=36"]).model)  # 35 + the answer slot
    with pytest.raises(ValueError, match="video QA adds an answer slot: the fusion sequence takes 36 positions"):
        check_qa_fusion(load_config("tiny", ["model.fusion_positions=35"]).model)
