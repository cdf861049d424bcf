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
    from stoa_vlp.train.settings import check_settings

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


def settings_error(overrides: list[str], task: str | None) -> None:
    """Load, set up for `task` (None: pre-training) and check, as the commands do before a run."""
    from stoa_vlp.train.settings import check_settings
    from stoa_vlp.tasks.pipeline import task_config

    config = load_config("tiny", ["data.val=val.json", *overrides])
    if task is not None:
        config = task_config(config, task)
    check_settings(config, pretraining=task is None)


@pytest.mark.parametrize(
    "overrides, task, message",
    [
        # crashed deep in the model (ZeroDivisionError, negative shapes, IndexError at the first step)
        (["model.vision_width=0"], None, "model.vision_width must be at least 1, got 0"),
        (["model.text_width=0", "model.embed_dim=0"], None, "model.text_width must be at least 1, got 0"),
        (["model.embed_dim=-1"], None, "model.embed_dim must be at least 1, got -1"),
        (["model.vision_heads=0"], None, "model.vision_heads must be at least 1, got 0"),
        (["model.text_heads=-1"], None, "model.text_heads must be at least 1, got -1"),
        (["model.vision_heads=3"], None, "model.vision_width 64 is not divisible by model.vision_heads 3"),
        (["model.text_heads=3"], "captioning", "model.text_width 64 is not divisible by model.text_heads 3"),
        (["model.vocab_size=1000"], None, "model.vocab_size must be at least the tokenizer's 49408 token ids"),
        (["model.head_dropout=1"], None, "model.head_dropout must be in [0, 1), got 1.0"),
        (["model.head_dropout=-0.1"], None, "model.head_dropout must be in [0, 1), got -0.1"),
        (["model.head_dropout=.nan"], None, "model.head_dropout must be a finite number, got nan"),
        (["task.beam_size=100000"], "captioning", "task.beam_size must be at most model.vocab_size (49408)"),
        # errors of torch or numpy that named no setting
        (["train.weight_decay=-1"], None, "train.weight_decay must be at least 0, got -1.0"),
        (["train.betas=[1.5, 0.9]"], None, "train.betas must each be in [0, 1) (Adam's moving-average decays), "
                                           "got [1.5, 0.9]"),
        (["train.eps=0"], None, "train.eps must be above 0"),
        (["train.seed=-1"], None, "train.seed must be in 0..2**32 - 1"),
        (["train.seed=4294967296"], None, "train.seed must be in 0..2**32 - 1"),
        # accepted silently
        (["model.text_layers=-1"], None, "model.text_layers must be at least 1, got -1"),
        (["model.text_layers=0"], None, "model.text_layers must be at least 1, got 0"),
        (["model.vision_layers=0"], None, "model.vision_layers must be at least 1, got 0"),
        (["model.fusion_layers=0"], "captioning", "model.fusion_layers must be at least 1, got 0"),
        (["model.object_layers=0"], None, "model.object_layers must be at least 1 with model.objects=true"),
        (["model.action_layers=-1"], "qa", "model.action_layers must be at least 1 with model.actions=true"),
        (["loss.vtc=.nan"], None, "loss.vtc must be a finite number, got nan"),
        (["loss.vtm=.inf"], "retrieval", "loss.vtm must be a finite number, got inf"),
        (["loss.vtc=-1"], "captioning", "loss.vtc must be >= 0, got -1.0"),
        (["loss.dota=-1"], "qa", "loss.dota must be >= 0, got -1.0"),
        (["train.lr=.inf"], None, "train.lr must be a finite number, got inf"),
        (["train.tower_lr_scale=-1"], None, "train.tower_lr_scale must be at least 0, got -1.0"),
        (["train.min_lr_scale=-1"], None, "train.min_lr_scale must be in [0, 1]"),
        (["train.min_lr_scale=5"], None, "train.min_lr_scale must be in [0, 1]"),
        (["train.clip_grad=.nan"], None, "train.clip_grad must be a finite number, got nan"),
        (["train.clip_grad=-1"], None, "train.clip_grad must be at least 0 (0: no clipping), got -1.0"),
        (["train.val_max_clips=-1"], None, "train.val_max_clips must be at least 0 (0: every validation clip)"),
        (["train.dist_timeout_minutes=1000000000000000"], None, "train.dist_timeout_minutes must be at most 10080"),
        (["data.max_bad_samples=5"], None, "data.max_bad_samples is a share of the samples: at most 1"),
        (["task.qb_norm=true", "task.qb_norm_beta=0"], "retrieval", "task.qb_norm_beta must be above 0"),
        (["task.qb_norm=true", "task.qb_norm_beta=-5"], "retrieval", "task.qb_norm_beta must be above 0"),
        (["task.length_penalty=.nan"], "captioning", "task.length_penalty must be a finite number, got nan"),
        (["task.length_penalty=.inf"], "captioning", "task.length_penalty must be a finite number, got inf"),
        (["model.text_len=2"], "captioning", "a caption needs at least 2"),
        (["task.max_caption_tokens=1"], "captioning", "a caption needs at least 2"),
        (["train.best_metric=val/bogus"], "captioning", "train.best_metric val/bogus is not a metric of captioning"),
        (["train.best_metric=val/accuracy_x"], "mc", "train.best_metric val/accuracy_x is not a metric of mc"),
        (["train.best_metric="], None, "train.best_metric must name a validation metric, val/NAME, got ''"),
        (["train.best_metric=t2v_r1"], "retrieval", "train.best_metric must name a validation metric"),
        # a typo, or a name the validation's settings do not give, was only said at the first validation
        (["train.best_metric=val/t2v_R1"], "retrieval", "train.best_metric val/t2v_R1 is not a metric of retrieval"),
        (["train.best_metric=val/t2v_dsl_r1"], "retrieval", "val/t2v_dsl_r1 is not a metric of retrieval"),
        (["train.best_metric=val/t2v_rerank_r1"], None, "is not a metric of zero-shot retrieval (pre-training)"),
        # the recalls in natural order: before, lexical (val/t2v_r1, val/t2v_r10, val/t2v_r5)
        (["train.best_metric=val/r1"], None, "(one of val/t2v_r1, val/t2v_r5, val/t2v_r10, val/v2t_grouped_r1, "
                                            "val/v2t_grouped_r5, val/v2t_grouped_r10, val/v2t_r1, val/v2t_r5, "
                                            "val/v2t_r10)"),
        (["train.best_metric=val/acc"], "qa", "val/acc is not a metric of qa validation"),
        # the highest value wins: a rank or a count would pick the worst checkpoint, or any
        (["train.best_metric=val/t2v_mdr"], "retrieval", "where the highest value wins"),
        (["train.best_metric=val/v2t_mnr"], None, "where the highest value wins"),
        (["train.best_metric=val/num_videos"], "captioning", "where the highest value wins"),
        (["train.best_metric=val/out_of_vocabulary"], "qa", "where the highest value wins"),
    ],
)
def test_bad_settings_fail_before_a_run_naming_the_key(overrides, task, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        settings_error(overrides, task)


@pytest.mark.parametrize(
    "overrides, task",
    [
        (["loss.mlm_probability=0"], "mc"),  # mc (as retrieval) turns MLM off
        (["loss.mlm_probability=0"], "captioning"),  # trains with none of the pre-training objectives
        (["loss.mlm=0", "loss.mlm_probability=0"], None),
        (["model.objects=false", "model.object_layers=0", "loss.dota=0"], None),
        (["model.actions=false", "model.action_layers=0", "loss.stasp=0"], None),
        (["train.clip_grad=0", "train.min_lr_scale=1", "data.max_bad_samples=1", "train.tower_lr_scale=0"], None),
        (["task.qb_norm_beta=0"], "retrieval"),  # QB-Norm off
        (["model.text_len=3"], "captioning"),
        (["train.best_metric=val/METEOR", "task.meteor=true"], "captioning"),
        (["train.best_metric=val/accuracy_vtc"], "mc"),
        (["train.best_metric=val/t2v_dsl_r1", "task.dual_softmax=true"], "retrieval"),
        (["train.best_metric=val/v2t_rerank_grouped_r5"], "retrieval"),  # where a video has several captions
        (["train.best_metric=val/t2v_qb_r10", "task.qb_norm=true"], "retrieval"),
        (["train.best_metric=val/v2t_grouped_r1"], None),
        (["train.best_metric=val/accuracy_what"], "qa"),  # an answer type of the split
        (["train.best_metric=bogus", "data.val="], "captioning"),  # no validation: not used
        (["task.beam_size=5"], "captioning"),
    ],
)
def test_settings_at_their_bounds_or_unused_are_accepted(overrides, task):
    settings_error(overrides, task)


def test_the_model_check_knows_the_tokenizer_vocabulary():
    from stoa_vlp.model.stoa import TOKENIZER_VOCAB_SIZE
    from stoa_vlp.tokenizer import Tokenizer

    assert Tokenizer(8).vocab_size == TOKENIZER_VOCAB_SIZE


def test_an_override_without_a_value_is_named_once():
    with pytest.raises(ConfigError, match=r"^override 'model.frames': not of the form section.key=value$"):
        load_config("tiny", ["model.frames"])
