"""CLIP checkpoint loading (open_clip and OpenAI TorchScript formats), parity with open_clip's towers,
tokenizer parity, and our own save/load round trip."""

import json
import re

import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn
from torchvision.transforms import v2

from stoa_vlp.config import ConfigError, load_config
from stoa_vlp.model import CheckpointError, STOAVLP, build_model, load_clip_weights, load_pretrained, save_pretrained
from stoa_vlp.model.checkpoint import (
    CONFIG_FILE,
    frame_table_keys,
    load_model_weights,
    resample_along_time,
    resample_frame_tables,
)
from stoa_vlp.model.stoa import fusion_length
from stoa_vlp.tokenizer import Tokenizer

# the new modules are not under test here; leaving them out keeps the ViT-B/16 tests fast
VIT_B_EXTRAS = ["model.fusion_layers=1", "model.objects=false", "model.actions=false"]
CAPTIONS = ["a man is riding a horse on the beach", "two dogs chase a red ball across the park"]


class _Holder(nn.Module):
    """An empty module; a tree of them carries a state dict into a TorchScript archive."""


def write_openai_archive(state: dict[str, torch.Tensor], path) -> None:
    """Write `state` as a TorchScript archive, the container format of OpenAI's CLIP `.pt` files."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


def tower_config(preset: str, quick_gelu: bool, extra: list[str] = ()):
    """Towers without joint blocks or temporal embeddings: they must reproduce open_clip exactly."""
    return load_config(
        preset,
        [
            "model.joint_blocks=0",
            "model.temporal_embedding=false",
            f"model.quick_gelu={str(quick_gelu).lower()}",
            "model.frames=1",
            *extra,
        ],
    ).model


def single_frame_video(model: STOAVLP, images: torch.Tensor):
    batch = images.shape[0]
    config = model.config
    boxes = torch.tensor([0.0, 0.0, 16.0, 16.0]).expand(batch, 1, config.boxes_per_frame, 4)
    labels = torch.ones(batch, 1, config.boxes_per_frame, dtype=torch.long)
    traj_labels = torch.ones(batch, config.trajectories, dtype=torch.long)
    return model.encode_video(
        images[:, None], boxes, labels, labels.bool(), traj_labels, traj_labels.bool()
    )


def assert_tower_parity(model: STOAVLP, reference: CLIP, image_size: int) -> None:
    torch.manual_seed(0)
    images = torch.randn(1, 3, image_size, image_size)
    model.eval()
    reference.eval()
    with torch.no_grad():
        expected_image = reference.encode_image(images)
        video = single_frame_video(model, images)
        torch.testing.assert_close(video.frames[:, 0], expected_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(video.video, expected_image, atol=1e-5, rtol=1e-5)
        # uint8 pixels, as the data pipeline gives them: the model's own normalisation against
        # open_clip's preprocessing constants applied with torchvision
        pixels = torch.randint(0, 256, (1, 3, image_size, image_size), dtype=torch.uint8)
        preprocess = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
        expected_pixels = reference.encode_image(preprocess(pixels))
        torch.testing.assert_close(single_frame_video(model, pixels).video, expected_pixels, atol=1e-5, rtol=1e-5)

        expected_text = reference.encode_text(open_clip.tokenize(CAPTIONS[:1]))
        for length in (77, model.config.text_len):
            tokens, mask = Tokenizer(length)(CAPTIONS[:1])
            text = model.encode_text(tokens, mask)
            torch.testing.assert_close(text.sentence, expected_text, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_open_clip_vit_b16_checkpoint_matches_open_clip(tmp_path):
    reference = open_clip.create_model("ViT-B-16", pretrained=None)
    path = tmp_path / "open_clip_vit_b16.pt"
    # an open_clip training checkpoint: {"state_dict": ...} with DDP's "module." prefix
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    model = STOAVLP(tower_config("base", False, VIT_B_EXTRAS))
    new_keys = load_clip_weights(model, path)
    path.unlink()
    assert "fusion.position_embedding" in new_keys and not any(k.startswith("text.") for k in new_keys)
    assert_tower_parity(model, reference, 224)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openai_torchscript_vit_b16_matches_open_clip(tmp_path):
    reference = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    # OpenAI files hold fp16 weights plus three scalar entries
    state = {k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-B-16.pt"
    write_openai_archive(state, path)
    reference.load_state_dict({k: v.float() for k, v in state.items() if k in reference.state_dict()})
    config = tower_config("base", True, VIT_B_EXTRAS)
    config.init_checkpoint = str(path)
    model = build_model(config)
    path.unlink()
    assert_tower_parity(model, reference, 224)
    # the fusion encoder starts as the first text block of the loaded tower
    torch.testing.assert_close(
        model.fusion.transformer.resblocks[0].attn.in_proj_weight,
        model.text.transformer.resblocks[0].attn.in_proj_weight,
    )


def tiny_open_clip(config) -> CLIP:
    return CLIP(
        config.embed_dim,
        CLIPVisionCfg(
            layers=config.vision_layers,
            width=config.vision_width,
            head_width=config.vision_width // config.vision_heads,
            patch_size=config.patch_size,
            image_size=config.image_size,
        ),
        CLIPTextCfg(layers=config.text_layers, width=config.text_width, heads=config.text_heads),
        quick_gelu=config.quick_gelu,
    )


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_tiny_towers_match_open_clip(tmp_path, quick_gelu):
    config = tower_config("tiny", quick_gelu)
    reference = tiny_open_clip(config)
    path = tmp_path / "tiny_clip.pt"
    torch.save(reference.state_dict(), path)
    model = STOAVLP(config)
    left_at_init = load_clip_weights(model, path)
    assert_tower_parity(model, reference, config.image_size)
    # the new transformers start from the loaded CLIP blocks, the encoders' outputs from its ln_post and proj
    for encoder in (model.trajectory_encoder, model.action_encoder):
        torch.testing.assert_close(encoder.ln.weight, reference.visual.ln_post.weight)
        torch.testing.assert_close(encoder.ln.bias, reference.visual.ln_post.bias)
        torch.testing.assert_close(encoder.proj, reference.visual.proj)
    started = {"trajectory_encoder.ln.weight", "action_encoder.proj", "fusion.ln_final.bias",
               "fusion.transformer.resblocks.0.attn.in_proj_weight",
               "action_encoder.transformer.resblocks.0.ln_1.weight"}
    assert not started & set(left_at_init)
    assert {"fusion.position_embedding", "object_tokens.frame_embedding", "trajectory_encoder.cls_embedding",
            "action_encoder.query_embedding", "match_head.weight"} <= set(left_at_init)
    pairs = [
        (model.fusion.transformer.resblocks[0], reference.transformer.resblocks[0]),
        (model.trajectory_encoder.transformer.resblocks[-1], reference.visual.transformer.resblocks[-1]),
        (model.action_encoder.transformer.resblocks[0], reference.visual.transformer.resblocks[-config.action_layers]),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours.mlp.c_fc.weight, theirs.mlp.c_fc.weight)
        torch.testing.assert_close(ours.attn.in_proj_weight, theirs.attn.in_proj_weight)
    torch.testing.assert_close(model.fusion.position_embedding[:64], reference.positional_embedding[:64])


def test_clip_loading_names_missing_unexpected_and_mismatched_keys(tmp_path):
    config = tower_config("tiny", True)
    state = tiny_open_clip(config).state_dict()
    del state["visual.ln_post.weight"]
    state["visual.extra_head.weight"] = torch.zeros(3)
    state["text_projection"] = torch.zeros(5, 5)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_clip_weights(STOAVLP(config), path)
    message = str(error.value)
    assert str(path) in message
    assert "missing keys: visual.ln_post.weight" in message
    assert "unexpected keys: visual.extra_head.weight" in message
    assert "text.text_projection (checkpoint (5, 5), model (64, 64))" in message


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_an_openai_file_needs_quick_gelu_and_64_wide_heads(tmp_path):
    openai_heads = ["model.vision_heads=1", "model.text_heads=1"]  # the tiny towers are 64 wide
    config = tower_config("tiny", True, openai_heads)
    path = tmp_path / "openai.pt"
    write_openai_archive(tiny_open_clip(config).state_dict(), path)
    with pytest.raises(CheckpointError, match="openai.pt is an OpenAI CLIP file, whose models use QuickGELU MLPs "
                                              "and 64-wide heads: set model.quick_gelu=true$"):
        load_clip_weights(STOAVLP(tower_config("tiny", False, openai_heads)), path)
    with pytest.raises(CheckpointError, match="64-wide heads: set model.vision_heads=1, model.text_heads=1$"):
        load_clip_weights(STOAVLP(tower_config("tiny", True)), path)  # 2 heads of 32: same weights
    load_clip_weights(STOAVLP(config), path)


def test_an_official_stoa_vlp_checkpoint_gives_its_clip_towers(tmp_path, caplog):
    openai_heads = ["model.vision_heads=1", "model.text_heads=1"]
    config = tower_config("tiny", True, openai_heads)
    reference = tiny_open_clip(config)
    # the layout of the official pytorch_model.bin.N: OpenAI's CLIP module under "clip.", STOA-VLP's modules
    # beside and inside it, CLIP4Clip's own at the top level
    state = {f"clip.{key}": value for key, value in reference.state_dict().items()}
    state.update({
        "clip.visual.transformer.object_encoder.box_categories": torch.zeros(12, 10, 64),
        "clip.object_fusion.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(192, 64),
        "clip.object_act_fusion.proj": torch.zeros(64, 64),
        "clip.fusion_transformer.resblocks.0.attn.in_proj_weight": torch.zeros(192, 64),
        "clip.fusion_positional_embedding": torch.zeros(210, 64),
        "clip.object_action": torch.zeros(1, 1, 4, 64),
        "obj_ln.weight": torch.ones(64),
        "obj_proj": torch.zeros(64, 64),
    })
    path = tmp_path / "pytorch_model.bin.1"
    torch.save(state, path)
    config.init_checkpoint = str(path)
    with caplog.at_level("WARNING", logger="stoa_vlp.model.checkpoint"):
        model = build_model(config)
    assert_tower_parity(model, reference, config.image_size)
    [record] = caplog.records
    assert ("8 weights of clip.fusion_positional_embedding, clip.fusion_transformer, clip.object_act_fusion, "
            "clip.object_action, clip.object_fusion, clip.visual.transformer.object_encoder, obj_ln, obj_proj "
            "are not imported") in record.getMessage()
    # the fusion starts from the loaded text tower, not from the checkpoint's fusion_transformer
    torch.testing.assert_close(model.fusion.transformer.resblocks[0].attn.in_proj_weight,
                               reference.transformer.resblocks[0].attn.in_proj_weight)
    with pytest.raises(CheckpointError, match="pytorch_model.bin.1 is a STOA-VLP / CLIP4Clip checkpoint, whose "
                                              "OpenAI CLIP towers use QuickGELU MLPs and 64-wide heads: set "
                                              "model.quick_gelu=true$"):
        load_clip_weights(STOAVLP(tower_config("tiny", False, openai_heads)), path)


def write_open_clip_folder(reference: CLIP, model_cfg: dict, folder, weights_name="open_clip_model.safetensors"):
    """An open_clip model folder as open_clip writes it for the Hugging Face Hub (its own config writer)."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    folder.mkdir()
    if weights_name.endswith(".safetensors"):
        save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, folder / weights_name)
    else:
        torch.save(reference.state_dict(), folder / weights_name)
    reference.visual.image_mean, reference.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    save_config_for_hf(reference, folder / "open_clip_config.json", model_cfg)
    return folder


def open_clip_model_cfg(config) -> dict:
    """The model_cfg open_clip would hold for the towers of `config` (its defaults left out)."""
    return {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.quick_gelu,
        "vision_cfg": {"image_size": config.image_size, "layers": config.vision_layers, "width": config.vision_width,
                       "head_width": config.vision_width // config.vision_heads, "patch_size": config.patch_size},
        "text_cfg": {"width": config.text_width, "heads": config.text_heads, "layers": config.text_layers},
    }


@pytest.mark.parametrize("weights_name", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_an_open_clip_model_folder_loads_and_matches_open_clip(tmp_path, weights_name):
    config = tower_config("tiny", False)
    reference = tiny_open_clip(config)
    folder = write_open_clip_folder(reference, open_clip_model_cfg(config), tmp_path / "ViT-tiny", weights_name)
    for path in (folder, folder / weights_name):  # the folder, or its weights file with the config beside it
        model = STOAVLP(config)
        load_clip_weights(model, path)
        assert_tower_parity(model, reference, config.image_size)


def test_an_open_clip_config_that_disagrees_with_the_model_config_is_refused(tmp_path):
    config = tower_config("tiny", False)
    reference = tiny_open_clip(config)
    model_cfg = {**open_clip_model_cfg(config), "quick_gelu": True}
    heads = 2 * config.vision_heads  # same weights, other attention
    model_cfg["vision_cfg"]["head_width"] = config.vision_width // heads
    folder = write_open_clip_folder(reference, model_cfg, tmp_path / "quickgelu")
    with pytest.raises(CheckpointError) as error:
        load_clip_weights(STOAVLP(config), folder)
    message = str(error.value)
    assert str(folder / "open_clip_config.json") in message
    assert "model.quick_gelu=true (the model has false)" in message
    assert f"model.vision_heads={heads} (the model has {config.vision_heads})" in message
    assert "text_" not in message  # the agreeing keys are not named


def test_an_open_clip_tower_option_stoa_vlp_does_not_build_is_refused(tmp_path):
    config = tower_config("tiny", False)
    model_cfg = open_clip_model_cfg(config)
    model_cfg["vision_cfg"]["pool_type"] = "avg"  # mean-pooled patches: same keys as CLS pooling
    model_cfg["text_cfg"]["no_causal_mask"] = True
    folder = write_open_clip_folder(tiny_open_clip(config), model_cfg, tmp_path / "avgpool")
    with pytest.raises(CheckpointError, match="vision_cfg.pool_type='avg', text_cfg.no_causal_mask=True"):
        load_clip_weights(STOAVLP(config), folder)


def test_a_folder_without_open_clip_weights_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="empty: a folder without open_clip weights"):
        load_clip_weights(STOAVLP(load_config("tiny").model), (tmp_path / "empty").mkdir() or tmp_path / "empty")
    folder = tmp_path / "bad_config"
    folder.mkdir()
    torch.save({}, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="open_clip_config.json: not an open_clip config with a model_cfg"):
        load_clip_weights(STOAVLP(load_config("tiny").model), folder)


def test_unreadable_clip_file_is_named(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt: cannot read it"):
        load_clip_weights(STOAVLP(load_config("tiny").model), path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_clip_weights(STOAVLP(load_config("tiny").model), tmp_path / "absent.pt")


def test_a_clip_file_with_a_damaged_zip_directory_is_named(tmp_path):
    path = tmp_path / "damaged.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    raw = bytearray(path.read_bytes())
    end = raw.rfind(b"PK\x05\x06")  # the end-of-central-directory record, which holds the directory's offset
    directory = int.from_bytes(raw[end + 16 : end + 20], "little")
    raw[directory : directory + 4] = b"XXXX"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged.pt: cannot read it as a CLIP checkpoint"):
        load_clip_weights(STOAVLP(load_config("tiny").model), path)


def test_a_stoa_vlp_checkpoint_is_refused_as_clip_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    save_pretrained(STOAVLP(load_config("tiny").model), tmp_path / "pt")
    weights = tmp_path / "pt" / "model.safetensors"
    qa_weights = tmp_path / "qa.safetensors"  # a task checkpoint with a head of its own, as QA saves
    save_file({f"model.{name}": value for name, value in load_file(weights).items()}, qa_weights)
    for path in (weights, qa_weights):
        with pytest.raises(CheckpointError) as error:
            build_model(load_config("tiny", [f"model.init_checkpoint={path}"]).model)
        assert str(error.value).startswith(f"{path} is a stoa-vlp checkpoint (it holds ")
        assert str(error.value).endswith("not CLIP weights: start from it with `stoa-vlp finetune --init` or "
                                         "`stoa_vlp.model.load_pretrained`")


def test_tokenizer_matches_open_clip():
    for length in (77, 32, 8):
        tokens, mask = Tokenizer(length)(CAPTIONS)
        torch.testing.assert_close(tokens, open_clip.tokenize(CAPTIONS, context_length=length).long())
        assert torch.equal(mask.sum(dim=1) - 1, (tokens == Tokenizer(length).eot_id).int().argmax(dim=1))


def random_inputs(config, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, config.frames, 3, config.image_size, config.image_size, generator=generator)
    corner = torch.rand(batch, config.frames, config.boxes_per_frame, 2, generator=generator) * config.image_size / 2
    boxes = torch.cat([corner, corner + config.image_size / 4], dim=-1)
    labels = torch.randint(1, 4, (batch, config.frames, config.boxes_per_frame), generator=generator)
    traj_labels = torch.tensor([1, 2, 3, 0]).repeat(batch, 1)[:, : config.trajectories]
    tokens, text_mask = Tokenizer(config.text_len)(CAPTIONS[:batch])
    return (frames, boxes, labels, labels > 0, traj_labels, traj_labels > 0), tokens, text_mask


def all_outputs(model, video_inputs, tokens, text_mask):
    model.eval()
    with torch.no_grad():
        video = model.encode_video(*video_inputs)
        text = model.encode_text(tokens, text_mask)
        fused = model.fuse(video, text.tokens, text_mask, "bidirectional")
        return [video.frames, video.trajectories, video.actions, text.tokens, fused.hidden, model.match_logits(fused)]


def test_save_load_round_trip_is_exact(tmp_path):
    config = load_config("tiny").model
    model = STOAVLP(config)
    inputs = random_inputs(config)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == config
    for before, after in zip(all_outputs(model, *inputs), all_outputs(loaded, *inputs)):
        assert torch.equal(before, after)


def test_a_task_checkpoint_with_its_own_head_loads_its_model_part(tmp_path):
    from safetensors.torch import load_file, save_file

    config = load_config("tiny").model
    model = STOAVLP(config)
    save_pretrained(model, tmp_path / "qa")
    weights = {f"model.{name}": value for name, value in load_file(tmp_path / "qa" / "model.safetensors").items()}
    save_file({**weights, "head.classifier.weight": torch.zeros(3, 4)}, tmp_path / "qa" / "model.safetensors")  # as QA saves
    loaded = load_pretrained(tmp_path / "qa")
    inputs = random_inputs(config)
    for before, after in zip(all_outputs(model, *inputs), all_outputs(loaded, *inputs)):
        assert torch.equal(before, after)


def test_loading_a_checkpoint_of_another_shape_names_the_keys(tmp_path):
    save_pretrained(STOAVLP(load_config("tiny", ["model.action_queries=3"]).model), tmp_path / "ckpt")
    mismatch = r"action_encoder.query_embedding \(checkpoint \(3, 64\), model \(2, 64\)\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_model_weights(STOAVLP(load_config("tiny").model), tmp_path / "ckpt" / "model.safetensors")
    save_pretrained(STOAVLP(load_config("tiny", ["model.objects=false"]).model), tmp_path / "no_objects")
    with pytest.raises(CheckpointError, match=r"missing keys: object_tokens\.") as error:
        load_model_weights(STOAVLP(load_config("tiny").model), tmp_path / "no_objects" / "model.safetensors")
    assert "trajectory_encoder.cls_embedding" in str(error.value)


def test_bad_checkpoint_config_is_named(tmp_path):
    save_pretrained(STOAVLP(load_config("tiny").model), tmp_path / "ckpt")
    (tmp_path / "ckpt" / CONFIG_FILE).write_text('{"model": {"frames": "many"}}')
    with pytest.raises(CheckpointError, match="config.json: not a valid model config.*frames"):
        load_pretrained(tmp_path / "ckpt")


def test_a_checkpoint_config_that_is_not_text_or_builds_no_model_is_an_error_naming_it(tmp_path):
    save_pretrained(STOAVLP(load_config("tiny").model), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / CONFIG_FILE
    config_file.write_bytes(b"\xff\xfe{")  # before: a bare UnicodeDecodeError
    with pytest.raises(CheckpointError, match=re.escape(f"{config_file}: not a valid model config ('utf-8' codec")):
        load_pretrained(tmp_path / "ckpt")
    config_file.write_text('{"model": {"vision_width": 32}}')  # before: a bare ValueError from the model
    with pytest.raises(CheckpointError, match=re.escape(f"{config_file}: invalid model config: model.vision_width 32 "
                                                        "is not divisible by model.vision_heads 12")):
        load_pretrained(tmp_path / "ckpt")
    save_pretrained(STOAVLP(load_config("tiny").model), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=re.escape(f"{config_file} with frames=100: invalid model config: "
                                                        "the fusion sequence takes 131 positions")):
        load_pretrained(tmp_path / "ckpt", frames=100)


def test_settings_a_checkpoint_config_lacks_are_named_with_the_defaults_they_take(tmp_path, caplog):
    save_pretrained(STOAVLP(load_config("tiny").model), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / CONFIG_FILE
    with caplog.at_level("WARNING", logger="stoa_vlp.model.checkpoint"):
        load_pretrained(tmp_path / "ckpt")
    assert not caplog.records
    settings = json.loads(config_file.read_text())
    del settings["model"]["frames"], settings["model"]["joint_blocks"]
    config_file.write_text(json.dumps(settings))
    for overrides, named in (({}, "model.frames=12, model.joint_blocks=2"), ({"frames": 4}, "model.joint_blocks=2")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="stoa_vlp.model.checkpoint"):
            model = load_pretrained(tmp_path / "ckpt", **overrides)
        assert [record.getMessage() for record in caplog.records] == [
            f"{config_file} lacks model settings, which take their defaults: {named} (the saved model may have been "
            "built with other values)"
        ]
        assert model.config.joint_blocks == 2 and model.config.frames == overrides.get("frames", 12)


def test_a_checkpoint_loads_at_another_frame_count_with_resampled_frame_tables(tmp_path, caplog):
    saved = STOAVLP(load_config("tiny").model)  # 4 frames
    save_pretrained(saved, tmp_path / "ckpt")
    config = load_config("tiny", ["model.frames=8"]).model
    model = STOAVLP(config)
    with caplog.at_level("INFO", logger="stoa_vlp.model.checkpoint"):
        load_model_weights(model, tmp_path / "ckpt" / "model.safetensors")
    tables = ["action_encoder.temporal_embedding", "object_tokens.frame_embedding", "visual.temporal_embedding"]
    assert [r.getMessage().split(".safetensors: ")[1] for r in caplog.records] == [
        "frame tables " + ", ".join(tables) + " resampled along time from 4 to 8 frames (linear interpolation)",
        "fusion.position_embedding: the frame rows resampled along time like the frame tables, the rows after them "
        "(video-SEP, trajectories, actions, text) kept in order behind them",
    ]
    old, new = saved.state_dict(), model.state_dict()
    for name in tables:
        before, after = old[name], new[name]
        assert after.shape == (8, 64)
        assert torch.equal(after[0], before[0]) and torch.equal(after[7], before[3])
        # new row j sits at old position 3j/7: row 2 at 6/7 (between rows 0 and 1), row 5 at 2 + 1/7
        torch.testing.assert_close(after[2], before[0] / 7 + 6 * before[1] / 7)
        torch.testing.assert_close(after[5], 6 * before[2] / 7 + before[3] / 7)
    for name, value in old.items():
        if name not in tables + ["fusion.position_embedding"]:
            assert torch.equal(new[name], value), name
    video = all_outputs(model, *random_inputs(config))[0]
    assert video.shape == (2, 8, config.embed_dim) and torch.isfinite(video).all()


def test_load_pretrained_takes_model_overrides_such_as_another_frame_count(tmp_path):
    saved = STOAVLP(load_config("tiny").model)  # 4 frames
    save_pretrained(saved, tmp_path / "ckpt")
    model = load_pretrained(tmp_path / "ckpt", frames=6)
    assert model.config.frames == 6 and model.visual.temporal_embedding.shape == (6, 64)
    torch.testing.assert_close(model.visual.temporal_embedding[5], saved.visual.temporal_embedding[3])
    torch.testing.assert_close(model.text.token_embedding.weight, saved.text.token_embedding.weight)
    # overrides are checked as config values are (before: a bare ValueError, or a crash deep in the build)
    for overrides, message in (({"frame": 6}, "unknown config key 'model.frame'"),
                               ({"frames": 0}, "model.frames must be at least 1, got 0"),
                               ({"frames": "8"}, "model.frames: expected an integer, got '8'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_pretrained(tmp_path / "ckpt", **overrides)


def test_another_frame_count_keeps_each_fusion_position_after_the_frames_on_its_saved_row(tmp_path):
    saved = STOAVLP(load_config("tiny").model)  # 4 frames, 64 fusion positions
    save_pretrained(saved, tmp_path / "ckpt")
    table = saved.fusion.position_embedding.detach()
    after_frames = fusion_length(saved.config, extra_slots=1) - 4  # video-SEP, trajectories, actions, text, QA slot
    for frames in (8, 2):
        loaded = load_pretrained(tmp_path / "ckpt", frames=frames).fusion.position_embedding.detach()
        assert loaded.shape == table.shape
        assert torch.equal(loaded[:frames], resample_along_time(table[:4], frames))
        # before: the table was kept as saved, so the first text token, saved on row 11, read row 15 with 8 frames
        assert torch.equal(loaded[frames : frames + after_frames], table[4 : 4 + after_frames])
    assert torch.equal(loaded[-2:], table[-2:])  # 2 frames: the table's end filled with its saved last rows


@pytest.mark.parametrize("loader", ["load_pretrained", "finetune --init"])
def test_a_model_without_frame_tables_realigns_its_fusion_positions_from_its_config(tmp_path, loader):
    """No temporal embedding, objects or actions: no table shows the saved frame count, config.json does."""
    from stoa_vlp.commands.task_common import load_model_weights_from

    ablated = ["model.temporal_embedding=false", "model.objects=false", "model.actions=false"]
    saved = STOAVLP(load_config("tiny", ablated).model)
    assert not frame_table_keys(saved)
    save_pretrained(saved, tmp_path / "ckpt")
    if loader == "load_pretrained":
        loaded = load_pretrained(tmp_path / "ckpt", frames=8)
    else:
        loaded = STOAVLP(load_config("tiny", [*ablated, "model.frames=8"]).model)
        load_model_weights_from(loaded, tmp_path / "ckpt")
    table, after_frames = saved.fusion.position_embedding.detach(), fusion_length(saved.config, extra_slots=1) - 4
    realigned = loaded.fusion.position_embedding.detach()
    assert torch.equal(realigned[:8], resample_along_time(table[:4], 8))
    assert torch.equal(realigned[8 : 8 + after_frames], table[4 : 4 + after_frames])


def test_a_wrapped_model_realigns_its_fusion_positions_too():
    class Wrapper(nn.Module):  # as the Pretrainer and QAModel hold the STOAVLP
        def __init__(self, model):
            super().__init__()
            self.model = model

    saved = STOAVLP(load_config("tiny").model)
    state = {f"model.{name}": value for name, value in saved.state_dict().items()}
    wrapper = Wrapper(STOAVLP(load_config("tiny", ["model.frames=6"]).model))
    loaded = resample_frame_tables(wrapper, state, "test")["model.fusion.position_embedding"]
    table = saved.fusion.position_embedding.detach()
    assert torch.equal(loaded[:6], resample_along_time(table[:4], 6))
    assert torch.equal(loaded[6:], table[4:-2])


def test_another_frame_count_does_not_excuse_another_width(tmp_path):
    save_pretrained(STOAVLP(load_config("tiny").model), tmp_path / "ckpt")
    model = STOAVLP(load_config("tiny", ["model.frames=8", "model.vision_width=32"]).model)
    with pytest.raises(CheckpointError, match="shape mismatch: ") as error:
        load_model_weights(model, tmp_path / "ckpt" / "model.safetensors")
    for name in ("action_encoder.temporal_embedding", "object_tokens.frame_embedding"):
        assert f"{name} (checkpoint (4, 64), model (8, 32))" in str(error.value)
