import pytest

from stoa_vlp.config import Config, ConfigError, load_config, parse_override, save_config


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
