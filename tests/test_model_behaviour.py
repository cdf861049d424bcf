"""STOAVLP behaviour on the tiny preset: shapes, masks, temporal order, prefix-LM mask, gradients,
parameter groups, ablations, autocast, and the batched trajectory/RoI code against brute force."""

import math

import pytest
import torch
import torch.nn.functional as F

from stoa_vlp.config import load_config
from stoa_vlp.model import STOAVLP, VideoFeatures
from stoa_vlp.model.objects import ROI_OUTPUT_SIZE, ObjectTokens
from stoa_vlp.model.towers import CLIP_MEAN, CLIP_STD, TextTower
from stoa_vlp.model.transformer import InputDtypeLayerNorm
from stoa_vlp.tokenizer import Tokenizer
from torchvision.ops import roi_align
from torchvision.transforms import v2

CAPTIONS = ["a man is riding a horse on the beach", "a red ball rolls to the left", "two dogs"]


def tiny(*overrides: str):
    return load_config("tiny", list(overrides)).model


def make_model(*overrides: str, seed: int = 0) -> STOAVLP:
    torch.manual_seed(seed)
    return STOAVLP(tiny(*overrides)).eval()


def make_inputs(config, batch: int = 3, seed: int = 0) -> dict:
    """Random clips with a mix of real and padded boxes, categories and text tokens."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.frames, config.boxes_per_frame)
    corner = torch.rand(*shape, 2, generator=generator) * config.image_size * 0.6
    size = 4 + torch.rand(*shape, 2, generator=generator) * config.image_size * 0.4
    box_labels = torch.randint(1, 5, shape, generator=generator)
    box_mask = torch.rand(shape, generator=generator) < 0.7
    box_labels = box_labels * box_mask
    traj_labels = torch.tensor([[1, 2, 3, 0], [4, 1, 0, 0], [2, 0, 0, 0]])[:batch, : config.trajectories]
    tokens, text_mask = Tokenizer(config.text_len)(CAPTIONS[:batch])
    return dict(
        frames=torch.randn(batch, config.frames, 3, config.image_size, config.image_size, generator=generator),
        boxes=torch.cat([corner, corner + size], dim=-1),
        box_labels=box_labels,
        box_mask=box_mask,
        traj_labels=traj_labels,
        traj_mask=traj_labels > 0,
        tokens=tokens,
        text_mask=text_mask,
    )


def video_args(inputs: dict) -> tuple:
    return tuple(inputs[k] for k in ("frames", "boxes", "box_labels", "box_mask", "traj_labels", "traj_mask"))


def run_all(model: STOAVLP, inputs: dict) -> dict:
    video = model.encode_video(*video_args(inputs))
    text = model.encode_text(inputs["tokens"], inputs["text_mask"])
    out = {"video": video, "text": text}
    for mode in ("bidirectional", "prefix"):
        out[mode] = model.fuse(video, text.tokens, inputs["text_mask"], mode)
    return out


def real_fusion_positions(model: STOAVLP, video: VideoFeatures, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool of the real (non-padded) fusion positions."""
    batch, frames = video.frames.shape[:2]
    ones = torch.ones(batch, frames + 1, dtype=torch.bool)
    actions = torch.ones(batch, video.actions.shape[1], dtype=torch.bool)
    return torch.cat([ones, video.traj_mask, actions, text_mask], dim=1)


def assert_same_real_outputs(model, first: dict, second: dict, text_mask) -> None:
    for name in ("frames", "video", "actions", "traj_mask"):
        assert torch.equal(getattr(first["video"], name), getattr(second["video"], name)), name
    traj_mask = first["video"].traj_mask
    assert torch.equal(first["video"].trajectories[traj_mask], second["video"].trajectories[traj_mask])
    assert torch.equal(first["text"].tokens[text_mask], second["text"].tokens[text_mask])
    assert torch.equal(first["text"].sentence, second["text"].sentence)
    real = real_fusion_positions(model, first["video"], text_mask)
    for mode in ("bidirectional", "prefix"):
        assert torch.equal(first[mode].hidden[real], second[mode].hidden[real]), mode
        assert torch.equal(first[mode].video_sep, second[mode].video_sep)
        assert torch.equal(first[mode].sentence, second[mode].sentence)


def test_output_shapes_follow_the_api():
    model = make_model()
    config = model.config
    inputs = make_inputs(config)
    with torch.no_grad():
        out = run_all(model, inputs)
        slot = torch.zeros(3, 1, 64)
        extra = model.fuse(out["video"], out["text"].tokens, inputs["text_mask"], "bidirectional", slot)
    batch, T, N, M = 3, config.frames, config.trajectories, config.action_queries
    L, E = config.text_len, config.embed_dim
    video = out["video"]
    assert video.frames.shape == (batch, T, E) and video.video.shape == (batch, E)
    assert video.trajectories.shape == (batch, N, E) and video.actions.shape == (batch, M, E)
    assert torch.equal(video.traj_mask, inputs["traj_mask"])
    torch.testing.assert_close(video.video, video.frames.mean(dim=1))
    assert out["text"].tokens.shape == (batch, L, E) and out["text"].sentence.shape == (batch, E)
    fused = out["prefix"]
    assert fused.hidden.shape == (batch, T + 1 + N + M + L, E)
    assert fused.text.shape == (batch, L, E) and fused.video_sep.shape == (batch, E)
    assert torch.equal(fused.video_sep, fused.hidden[:, T])
    assert extra.hidden.shape == (batch, T + 1 + N + M + L + 1, E)
    assert model.match_logits(fused).shape == (batch, 2)
    assert model.lm_logits(fused.text).shape == (batch, L, config.vocab_size)
    picked = video.index_select(torch.tensor([2, 0]))
    assert torch.equal(picked.actions, video.actions[[2, 0]]) and torch.equal(picked.traj_mask, video.traj_mask[[2, 0]])
    assert not video.detach().frames.requires_grad


def test_uint8_frames_are_normalised_as_torchvision_does_it():
    """The data pipeline hands the model uint8 frames; the result equals the model on frames
    normalised on the CPU with torchvision (the pipeline before 2026-11-27), bit for bit."""
    model = make_model()
    config = model.config
    inputs = make_inputs(config)
    pixels = torch.randint(0, 256, inputs["frames"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])
    with torch.no_grad():
        ours = run_all(model, {**inputs, "frames": pixels})["video"]
        reference = run_all(model, {**inputs, "frames": normalise(pixels)})["video"]
    for name in ("frames", "trajectories", "actions"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name
    assert not any("pixel" in key for key in model.state_dict())  # constants, not checkpoint entries
    tower = model.visual.double()  # a model cast to another dtype gets its frames in that dtype
    with torch.no_grad():
        assert torch.equal(tower(pixels).frames, tower(normalise(pixels).double()).frames)
    with pytest.raises(ValueError, match="uint8 RGB or CLIP-normalised floats, got torch.int16"):
        model.visual(pixels.to(torch.int16))


def test_sentence_is_the_end_token_feature():
    model = make_model()
    inputs = make_inputs(model.config)
    with torch.no_grad():
        text = model.encode_text(inputs["tokens"], inputs["text_mask"])
    end = (inputs["tokens"] == Tokenizer().eot_id).int().argmax(dim=1)
    assert torch.equal(text.sentence, text.tokens[torch.arange(3), end])


def test_padded_boxes_and_categories_change_no_output():
    model = make_model()
    inputs = make_inputs(model.config)
    changed = dict(inputs)
    pads = ~inputs["box_mask"]
    changed["boxes"] = torch.where(pads[..., None], torch.tensor([5.0, 7.0, 60.0, 61.0]), inputs["boxes"])
    changed["box_labels"] = torch.where(pads, 3, inputs["box_labels"])
    changed["traj_labels"] = torch.where(inputs["traj_mask"], inputs["traj_labels"], 2)
    with torch.no_grad():
        assert_same_real_outputs(model, run_all(model, inputs), run_all(model, changed), inputs["text_mask"])
        # the features at padded trajectory slots cannot reach any real fusion position either
        first = run_all(model, inputs)
        video = first["video"]
        noisy_trajectories = torch.where(video.traj_mask[..., None], video.trajectories, 1e3)
        noisy = VideoFeatures(video.frames, video.video, noisy_trajectories, video.traj_mask, video.actions)
        real = real_fusion_positions(model, video, inputs["text_mask"])
        for mode in ("bidirectional", "prefix"):
            again = model.fuse(noisy, first["text"].tokens, inputs["text_mask"], mode)
            assert torch.equal(again.hidden[real], first[mode].hidden[real])


def test_padded_text_tokens_change_no_output():
    model = make_model()
    inputs = make_inputs(model.config)
    changed = dict(inputs, tokens=torch.where(inputs["text_mask"], inputs["tokens"], 1234))
    with torch.no_grad():
        first, second = run_all(model, inputs), run_all(model, changed)
    assert not torch.equal(first["text"].tokens, second["text"].tokens)  # the padded rows did change
    assert_same_real_outputs(model, first, second, inputs["text_mask"])


def test_zero_detections_give_masked_trajectories_and_no_nan():
    model = make_model().train()
    inputs = make_inputs(model.config)
    inputs["box_mask"][0] = False
    inputs["box_labels"][0] = 0
    inputs["traj_mask"][0] = False
    inputs["traj_labels"][0] = 0
    out = run_all(model, inputs)
    assert not out["video"].traj_mask[0].any()
    loss = 0
    for mode in ("bidirectional", "prefix"):
        assert torch.isfinite(out[mode].hidden).all()
        loss = loss + model.lm_logits(out[mode].sentence).logsumexp(-1).mean() + model.match_logits(out[mode]).sum()
    loss = loss + out["video"].trajectories.square().sum() + out["video"].actions.square().sum()
    assert torch.isfinite(out["video"].trajectories).all() and torch.isfinite(out["video"].actions).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a batch in which no clip has any detection runs too
    inputs["box_mask"][:] = False
    inputs["traj_mask"][:] = False
    with torch.no_grad():
        assert torch.isfinite(run_all(model, inputs)["prefix"].hidden).all()


def reverse_frames(inputs: dict) -> dict:
    return dict(inputs, **{k: inputs[k].flip(1) for k in ("frames", "boxes", "box_labels", "box_mask")})


def test_temporal_embedding_makes_the_video_feature_order_sensitive():
    model = make_model("model.objects=false")
    inputs = make_inputs(model.config)
    with torch.no_grad():
        forward = model.encode_video(*video_args(inputs))
        backward = model.encode_video(*video_args(reverse_frames(inputs)))
    assert (forward.video - backward.video).abs().max() > 1e-4
    assert (forward.actions - backward.actions).abs().max() > 1e-4


def test_without_temporal_embedding_and_objects_video_and_actions_ignore_frame_order():
    model = make_model("model.temporal_embedding=false", "model.objects=false")
    inputs = make_inputs(model.config)
    with torch.no_grad():
        forward = model.encode_video(*video_args(inputs))
        backward = model.encode_video(*video_args(reverse_frames(inputs)))
    torch.testing.assert_close(forward.video, backward.video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forward.actions, backward.actions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forward.frames.flip(1), backward.frames, atol=1e-5, rtol=1e-5)


def hand_run_video_tower(model: STOAVLP, frames: torch.Tensor) -> list[torch.Tensor]:
    """Every video-tower block's output (B*T, 1+P, W), the blocks written out: each frame alone
    through the first vision_layers - joint_blocks blocks, then frame t's temporal embedding added to
    its tokens and each clip's T frames' tokens concatenated into one sequence through the joint blocks."""
    visual, config = model.visual, model.config
    first_joint = config.vision_layers - config.joint_blocks
    batch, count = frames.shape[:2]
    x = visual.embed(visual.normalize(frames.flatten(0, 1)))
    outputs = []
    for index, block in enumerate(visual.transformer.resblocks):
        if index < first_joint:
            x = torch.cat([block(x[n : n + 1]) for n in range(batch * count)])
        else:
            if index == first_joint and visual.temporal_embedding is not None:
                x = x + visual.temporal_embedding.repeat(batch, 1)[:, None]  # row n is frame n % T
            clips = [torch.cat(list(x[b * count : (b + 1) * count]))[None] for b in range(batch)]  # (1, T*(1+P), W)
            x = torch.cat([block(clip).reshape(count, -1, x.shape[2]) for clip in clips])
        outputs.append(x)
    return outputs


@pytest.mark.parametrize(
    "overrides",
    [
        (),  # tiny: 2 blocks, the last joint, both taps after block 1
        ("model.vision_layers=3", "model.joint_blocks=2", "model.action_tap_layer=2", "model.object_tap_layer=1"),
        ("model.joint_blocks=2", "model.action_tap_layer=2", "model.temporal_embedding=false"),
        ("model.joint_blocks=0",),
    ],
)
def test_video_tower_equals_its_blocks_run_by_hand(overrides):
    """Per-frame blocks, then joint blocks over all frames' tokens; the action tap is block
    action_tap_layer's output, the object tap block object_tap_layer's patch tokens."""
    model = make_model(*overrides)
    config = model.config
    frames = make_inputs(config, batch=2)["frames"]
    with torch.no_grad():
        tower = model.visual(frames)
        blocks = hand_run_video_tower(model, frames)
    expected_frames = model.visual.ln_post(blocks[-1][:, 0]) @ model.visual.proj
    torch.testing.assert_close(tower.frames, expected_frames.reshape(2, config.frames, -1), atol=1e-5, rtol=1e-5)
    action_tap = blocks[config.action_tap_layer - 1].reshape(2, config.frames, *blocks[0].shape[1:])
    torch.testing.assert_close(tower.action_tap, action_tap, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tower.object_tap, blocks[config.object_tap_layer - 1][:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("joint_blocks", [0, 1])
def test_a_frame_feature_sees_other_frames_only_through_joint_blocks(joint_blocks):
    model = make_model(f"model.joint_blocks={joint_blocks}")
    inputs = make_inputs(model.config, batch=1)
    changed = inputs["frames"].clone()
    changed[:, 1] = torch.randn(changed[:, 1].shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first, second = model.visual(inputs["frames"]).frames, model.visual(changed).frames
    assert not torch.allclose(first[:, 1], second[:, 1])
    others = [0, 2, 3]
    if joint_blocks:
        assert ((first[:, others] - second[:, others]).abs().amax(dim=-1) > 0.01).all()  # every other frame sees frame 1
    else:
        assert torch.equal(first[:, others], second[:, others])


def test_match_logits_are_the_head_on_video_sep_then_sentence():
    model = make_model()
    inputs = make_inputs(model.config)
    with torch.no_grad():
        out = run_all(model, inputs)
        fused = out["bidirectional"]
        ends = inputs["text_mask"].sum(dim=1) - 1
        video_sep = fused.hidden[:, model.config.frames]  # the slot after the T frames
        visual = fused.hidden.shape[1] - model.config.text_len
        sentence = fused.hidden[torch.arange(3), visual + ends]  # the fused end token
        width = model.config.text_width
        weight, bias = model.match_head.weight, model.match_head.bias
        expected = video_sep @ weight[:, :width].T + sentence @ weight[:, width:].T + bias
        torch.testing.assert_close(model.match_logits(fused), expected, atol=1e-5, rtol=1e-5)


def test_prefix_mask_hides_later_text():
    model = make_model()
    inputs = make_inputs(model.config)
    config = model.config
    visual = config.frames + 1 + config.trajectories + config.action_queries
    position = 2  # a real word token of every caption
    assert inputs["text_mask"][:, position].all()
    changed = dict(inputs, tokens=inputs["tokens"].clone())
    changed["tokens"][:, position] = 999
    with torch.no_grad():
        first, second = run_all(model, inputs), run_all(model, changed)
    prefix_a, prefix_b = first["prefix"].hidden, second["prefix"].hidden
    assert torch.equal(prefix_a[:, : visual + position], prefix_b[:, : visual + position])
    assert not torch.allclose(prefix_a[:, visual + position], prefix_b[:, visual + position])
    # in bidirectional mode the same change does reach the visual positions
    assert not torch.allclose(first["bidirectional"].hidden[:, :visual], second["bidirectional"].hidden[:, :visual])


def pretraining_style_loss(model: STOAVLP, inputs: dict) -> torch.Tensor:
    """A sum touching every output: VTC-like, VTM, MLM-like and PLM-like LM terms, trajectories, actions."""
    video = model.encode_video(*video_args(inputs))
    text = model.encode_text(inputs["tokens"], inputs["text_mask"])
    mask = inputs["text_mask"]
    similarity = model.logit_scale.exp() * F.normalize(text.sentence, dim=-1) @ F.normalize(video.video, dim=-1).T
    targets = torch.arange(len(similarity))
    loss = F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets)
    masked = torch.zeros_like(mask)
    masked[:, 2] = True
    mlm_input = torch.where(masked[..., None], model.mask_embedding.expand_as(text.tokens), text.tokens)
    bidirectional = model.fuse(video, mlm_input, mask, "bidirectional")
    loss = loss + F.cross_entropy(model.match_logits(bidirectional), torch.ones(len(mask), dtype=torch.long))
    loss = loss + F.cross_entropy(model.lm_logits(bidirectional.text[masked]), inputs["tokens"][masked])
    prefix = model.fuse(video, text.tokens, mask, "prefix")
    next_mask = mask[:, 1:]
    loss = loss + F.cross_entropy(model.lm_logits(prefix.text[:, :-1][next_mask]), inputs["tokens"][:, 1:][next_mask])
    target = text.sentence.detach()[:, None]
    loss = loss + F.mse_loss(video.trajectories[video.traj_mask], target.expand_as(video.trajectories)[video.traj_mask])
    return loss + F.mse_loss(video.actions, target.expand_as(video.actions))


def test_every_trainable_parameter_gets_a_gradient_with_and_without_checkpointing():
    grads = {}
    for checkpointing in (False, True):
        model = make_model(f"model.grad_checkpointing={str(checkpointing).lower()}").train()
        pretraining_style_loss(model, make_inputs(model.config)).backward()
        without = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert without == [], f"no gradient for {without}"
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_new_encoders_start_from_the_last_visual_blocks_lined_up_at_the_end(depth):
    model = make_model("model.vision_layers=2", f"model.object_layers={depth}", f"model.action_layers={depth}")
    visual = [block.state_dict() for block in model.visual.transformer.resblocks]
    for encoder in (model.trajectory_encoder, model.action_encoder):
        blocks = encoder.transformer.resblocks
        for position, block in enumerate(blocks):
            source = len(visual) - len(blocks) + position  # < 0: deeper than the ViT, keeps its own start
            weights = block.state_dict()
            same = [all(torch.equal(weights[key], start[key]) for key in weights) for start in visual]
            assert same == [index == source for index in range(len(visual))], (depth, position)


def test_new_encoders_outputs_start_from_the_visual_ln_post_and_proj():
    model = make_model()
    with torch.no_grad():
        model.visual.ln_post.weight.normal_()
    model.initialise_from_towers()
    for encoder in (model.trajectory_encoder, model.action_encoder):
        torch.testing.assert_close(encoder.ln.weight, model.visual.ln_post.weight)
        torch.testing.assert_close(encoder.proj, model.visual.proj)
    fresh = make_model()
    for encoder in (fresh.trajectory_encoder, fresh.action_encoder):
        torch.testing.assert_close(encoder.proj, fresh.visual.proj)


def weight_std(weight: torch.Tensor) -> float:
    return weight.float().std().item()


def test_text_tower_starts_as_open_clip_text_transformer():
    config = load_config("base").model
    text = TextTower(config)
    width, layers = config.text_width, config.text_layers
    projection_std = width**-0.5 * (2 * layers) ** -0.5
    expected = {"attn.in_proj_weight": width**-0.5, "attn.out_proj.weight": projection_std,
                "mlp.c_fc.weight": (2 * width) ** -0.5, "mlp.c_proj.weight": projection_std}
    for index, block in enumerate(text.transformer.resblocks):
        weights = dict(block.named_parameters())
        for name, std in expected.items():
            assert weight_std(weights[name]) == pytest.approx(std, rel=0.03), (index, name)
        assert not block.attn.in_proj_bias.any() and not block.attn.out_proj.bias.any()
    assert weight_std(text.token_embedding.weight) == pytest.approx(0.02, rel=0.03)
    assert weight_std(text.positional_embedding) == pytest.approx(0.01, rel=0.03)
    assert weight_std(text.text_projection) == pytest.approx(width**-0.5, rel=0.03)


def test_object_token_embeddings_start_as_the_reference():
    torch.manual_seed(0)
    tokens = ObjectTokens(load_config("base").model)
    assert not tokens.slot_embedding.any()
    assert weight_std(tokens.frame_embedding) == pytest.approx(0.01, rel=0.05)


def test_parameter_groups():
    model = make_model()
    groups = {g["name"]: g for g in model.param_groups(lr=1e-4, tower_lr_scale=0.01, weight_decay=0.2)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {name: {names[id(p)] for p in g["params"]} for name, g in groups.items()}
    all_listed = [n for group in members.values() for n in group]
    assert sorted(all_listed) == sorted(names.values())  # each parameter exactly once
    assert groups["tower_decay"]["lr"] == pytest.approx(1e-6) and groups["tower_no_decay"]["lr"] == pytest.approx(1e-6)
    assert groups["new_decay"]["lr"] == 1e-4 and groups["new_no_decay"]["lr"] == 1e-4
    assert groups["tower_decay"]["weight_decay"] == 0.2 and groups["new_decay"]["weight_decay"] == 0.2
    assert groups["tower_no_decay"]["weight_decay"] == 0.0 and groups["new_no_decay"]["weight_decay"] == 0.0
    assert {"visual.proj", "text.text_projection", "visual.conv1.weight"} <= members["tower_decay"]
    tower_no_decay = {"logit_scale", "text.token_embedding.weight", "visual.ln_pre.bias", "visual.class_embedding"}
    assert tower_no_decay <= members["tower_no_decay"]
    new_decay = {"fusion.transformer.resblocks.0.attn.in_proj_weight", "lm_transform.weight", "match_head.weight"}
    assert new_decay <= members["new_decay"]
    new_no_decay = {"visual.temporal_embedding", "mask_embedding", "object_tokens.label_embedding.weight", "lm_bias"}
    assert new_no_decay <= members["new_no_decay"]
    new = members["new_decay"] | members["new_no_decay"]
    assert all(not n.startswith(("visual.", "text.")) or n == "visual.temporal_embedding" for n in new)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.objects=false",),
        ("model.actions=false",),
        ("model.objects=false", "model.actions=false", "model.temporal_embedding=false"),
        ("model.joint_blocks=0",),
        ("model.joint_blocks=2", "model.action_tap_layer=2"),
    ],
)
def test_ablations_run(overrides):
    model = make_model(*overrides)
    config = model.config
    inputs = make_inputs(config)
    with torch.no_grad():
        out = run_all(model, inputs)
    N = config.trajectories if config.objects else 0
    M = config.action_queries if config.actions else 0
    assert out["video"].trajectories.shape == (3, N, 64) and out["video"].traj_mask.shape == (3, N)
    assert out["video"].actions.shape == (3, M, 64)
    assert out["prefix"].hidden.shape[1] == config.frames + 1 + N + M + config.text_len
    assert torch.isfinite(out["bidirectional"].hidden).all()
    assert not any("temporal_embedding" in n for n, _ in model.named_parameters()) or config.temporal_embedding


OBJECT_INPUTS = ("boxes", "box_labels", "box_mask", "traj_labels", "traj_mask")


@pytest.mark.parametrize(
    "overrides, boxes_matter",
    [
        ((), True),  # the control: the same change does reach the full model's outputs
        (("model.objects=false",), False),
        (("model.objects=false", "model.actions=false", "model.temporal_embedding=false"), False),
    ],
)
def test_without_objects_no_output_depends_on_the_boxes(overrides, boxes_matter):
    model = make_model(*overrides)
    inputs = make_inputs(model.config)
    other = make_inputs(model.config, seed=1)
    other["traj_labels"] = other["traj_labels"].roll(1, dims=0)
    other["traj_mask"] = other["traj_labels"] > 0
    changed = dict(inputs, **{name: other[name] for name in OBJECT_INPUTS})
    with torch.no_grad():
        first, second = run_all(model, inputs), run_all(model, changed)
    same = [torch.equal(first[mode].hidden, second[mode].hidden) for mode in ("bidirectional", "prefix")]
    same += [torch.equal(getattr(first["video"], name), getattr(second["video"], name)) for name in ("frames", "actions")]
    assert same == [not boxes_matter, not boxes_matter, True, not boxes_matter]


def test_without_actions_the_frame_and_trajectory_features_are_the_full_models():
    full = make_model()
    ablated = make_model("model.actions=false")
    loaded = ablated.load_state_dict(full.state_dict(), strict=False)
    assert loaded.missing_keys == [] and {key.split(".")[0] for key in loaded.unexpected_keys} == {"action_encoder"}
    inputs = make_inputs(full.config)
    with torch.no_grad():
        ours, reference = ablated.encode_video(*video_args(inputs)), full.encode_video(*video_args(inputs))
    for name in ("frames", "video", "trajectories", "traj_mask"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name
    assert ours.actions.shape == (3, 0, full.config.embed_dim)


def test_bf16_autocast_runs_close_to_fp32():
    model = make_model()
    inputs = make_inputs(model.config)
    with torch.no_grad():
        full = run_all(model, inputs)["prefix"].hidden
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run_all(model, inputs)
            logits = model.lm_logits(out["prefix"].text)
    assert torch.isfinite(logits).all()
    assert (out["prefix"].hidden.float() - full).abs().mean() < 0.1 * full.abs().mean()


def test_a_model_cast_to_bf16_runs_on_uint8_and_float_frames_close_to_fp32():
    """`model.to(torch.bfloat16)` without autocast: frames, boxes and every module follow the weights."""
    model = make_model()
    inputs = make_inputs(model.config)
    pixels = torch.randint(0, 256, inputs["frames"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = run_all(model, {**inputs, "frames": pixels})["prefix"].hidden
        model.to(torch.bfloat16)
        for frames in (pixels, model.visual.normalize(pixels).float()):  # float32 frames given to a bf16 model
            out = run_all(model, {**inputs, "frames": frames})["prefix"].hidden
            assert out.dtype == torch.bfloat16
            assert (out.float() - full).abs().mean() < 0.1 * full.abs().mean()


def test_misshaped_frames_and_a_non_bool_text_mask_are_named():
    model = make_model()
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match=r"frames must be \(clips, frames, 3, height, width\), got shape \(4, 3, 64, 64\)"):
        model.visual(inputs["frames"][0])  # one clip without its batch dimension
    with pytest.raises(ValueError, match=r"got shape \(3, 4, 64, 64, 3\)"):
        model.visual(inputs["frames"].permute(0, 1, 3, 4, 2))  # channels last
    video = model.encode_video(*video_args(inputs))
    text_mask = inputs["text_mask"].long()  # 0/1, as other tokenizers give it
    with pytest.raises(ValueError, match="text_mask must be bool, True at real tokens, got torch.int64"):
        model.encode_text(inputs["tokens"], text_mask)
    with pytest.raises(ValueError, match="text_mask must be bool"):
        model.fuse(video, model.encode_text(inputs["tokens"], inputs["text_mask"]).tokens, text_mask, "prefix")


def test_low_precision_residual_changes_only_the_video_tower_layer_norms_and_nothing_without_autocast():
    plain = make_model()
    low = make_model("model.low_precision_residual=true")
    low.load_state_dict(plain.state_dict())
    inputs = make_inputs(plain.config)
    with torch.no_grad():
        assert_same_real_outputs(plain, run_all(plain, inputs), run_all(low, inputs), inputs["text_mask"])
    # CUDA autocast computes layer_norm in float32; these cast the result back (CPU autocast keeps bf16 anyway)
    casting = {name for name, module in low.named_modules() if isinstance(module, InputDtypeLayerNorm)}
    blocks = [f"visual.transformer.resblocks.{i}.ln_{j}" for i in range(low.config.vision_layers) for j in (1, 2)]
    assert casting == {"visual.ln_pre", *blocks}
    assert not any(isinstance(module, InputDtypeLayerNorm) for module in plain.modules())


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match=r"model.embed_dim \(32\) must equal model.text_width \(64\)"):
        STOAVLP(tiny("model.embed_dim=32"))
    with pytest.raises(ValueError, match="object_tap_layer must be in 1..2"):
        STOAVLP(tiny("model.object_tap_layer=3"))
    with pytest.raises(ValueError, match="model.actions needs action_queries of at least 1"):
        STOAVLP(tiny("model.action_queries=0"))
    model = make_model()
    inputs = make_inputs(model.config)
    inputs["box_labels"][0, 0, 0] = model.config.num_object_classes
    message = r"box labels must be in 0..63 \(model.num_object_classes=64\)"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        run_all(model, inputs)
    with pytest.raises(ValueError, match=r"fusion sequence takes 35 positions .* more than model.fusion_positions=20"):
        STOAVLP(tiny("model.fusion_positions=20"))  # checked when built, not at the first step


def test_trajectories_match_one_sequence_per_category_brute_force():
    model = make_model()
    inputs = make_inputs(model.config)
    encoder = model.trajectory_encoder
    with torch.no_grad():
        tower = model.visual(inputs["frames"])
        tokens = model.object_tokens(tower.object_tap, inputs["boxes"], inputs["box_labels"], inputs["box_mask"])
        batched = encoder(tokens, inputs["box_labels"], inputs["box_mask"], inputs["traj_labels"], inputs["traj_mask"])
        for b in range(tokens.shape[0]):
            for n in range(inputs["traj_labels"].shape[1]):
                if not inputs["traj_mask"][b, n]:
                    continue
                member = inputs["box_mask"][b] & (inputs["box_labels"][b] == inputs["traj_labels"][b, n])
                sequence = torch.cat([encoder.cls_embedding[None], tokens[b][member]])[None]  # no padding at all
                expected = encoder.ln(encoder.transformer(sequence)[0, 0]) @ encoder.proj
                torch.testing.assert_close(batched[b, n], expected, atol=1e-5, rtol=1e-5)


def test_action_encoder_matches_per_frame_brute_force():
    model = make_model()
    inputs = make_inputs(model.config)
    actions = model.action_encoder
    with torch.no_grad():
        tower = model.visual(inputs["frames"])
        tokens = model.object_tokens(tower.object_tap, inputs["boxes"], inputs["box_labels"], inputs["box_mask"])
        batched = actions(tower.action_tap, tokens, inputs["box_mask"])
        queries = actions.ln_query(actions.query_embedding)  # (M, W)
        width = queries.shape[1]
        for b in range(tokens.shape[0]):
            per_frame = []
            for t in range(model.config.frames):
                real_objects = tokens[b, t][inputs["box_mask"][b, t]]
                context = actions.ln_context(torch.cat([tower.action_tap[b, t, 1:], real_objects]))
                weights = torch.softmax(queries @ context.T / math.sqrt(width), dim=-1)
                per_frame.append(weights @ context + actions.temporal_embedding[t])
            cls = tower.action_tap[b, :, 0].mean(0).expand(len(queries), 1, width)
            sequence = torch.cat([cls, torch.stack(per_frame, 1)], dim=1)
            expected = actions.ln(actions.transformer(sequence)[:, 0]) @ actions.proj
            torch.testing.assert_close(batched[b], expected, atol=1e-5, rtol=1e-5)


def test_roi_align_uses_the_patch_grid_of_the_input_frame():
    """On a patch map linear in (column, row), a box's mean RoI feature is the map at the box centre."""
    model = make_model()
    objects = model.object_tokens
    grid = model.config.image_size // model.config.patch_size
    steps = torch.arange(grid, dtype=torch.float32)
    rows, columns = torch.meshgrid(steps, steps, indexing="ij")
    patch_tokens = (3 * columns + 7 * rows).reshape(1, grid * grid, 1).expand(1, grid * grid, 2)
    boxes = torch.tensor([[[[16.0, 16.0, 32.0, 48.0], [20.0, 12.0, 44.0, 28.0]]]])  # (1, 1, 2, 4) pixels
    regions = objects.regions(patch_tokens, boxes)
    assert regions.shape == (2, ROI_OUTPUT_SIZE**2, 2)
    scale = grid / model.config.image_size
    centre_x = (boxes[0, 0, :, 0] + boxes[0, 0, :, 2]) / 2 * scale - 0.5  # aligned=True: pixel centres
    centre_y = (boxes[0, 0, :, 1] + boxes[0, 0, :, 3]) / 2 * scale - 0.5
    torch.testing.assert_close(regions[:, :, 0].mean(dim=1), 3 * centre_x + 7 * centre_y)
    with pytest.raises(ValueError, match="built for a 4x4 patch grid, got 9 patches"):
        objects.regions(torch.zeros(1, 9, 2), boxes)


def test_roi_align_equals_torchvision_forward_and_backward():
    """The GEMM form against torchvision's roi_align (aligned, sampling ratio 2), borders included."""
    objects = make_model().object_tokens
    grid, size = objects.grid, objects.image_size
    generator = torch.Generator().manual_seed(0)
    frames, slots, width = 6, 5, 3
    corner = torch.rand(frames, slots, 2, generator=generator) * size * 1.2 - size * 0.2  # some reach outside
    boxes = torch.cat([corner, corner + torch.rand(frames, slots, 2, generator=generator) * size * 0.8], dim=-1)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # a padded box
    boxes[0, 1] = torch.tensor([0.0, 0.0, size, size])  # the whole frame
    boxes[0, 2] = torch.tensor([size - 1.0, size - 1.0, size, size])  # a corner pixel: past the last centre
    boxes[0, 3] = torch.tensor([-size, -size, -size / 2, -size / 2])  # wholly outside
    boxes[0, 4] = torch.tensor([10.0, 12.0, 10.5, 12.5])  # smaller than a patch
    patch_tokens = torch.randn(frames, grid * grid, width, generator=generator, requires_grad=True)
    grad_out = torch.randn(frames * slots, ROI_OUTPUT_SIZE**2, width, generator=generator)
    ours = objects.regions(patch_tokens, boxes[None])
    (ours * grad_out).sum().backward()
    patch_map = patch_tokens.detach().transpose(1, 2).reshape(frames, width, grid, grid).requires_grad_()
    rois = torch.cat([torch.arange(frames).repeat_interleave(slots)[:, None].float(), boxes.reshape(-1, 4)], dim=1)
    reference = roi_align(patch_map, rois, ROI_OUTPUT_SIZE, spatial_scale=grid / size, sampling_ratio=2, aligned=True)
    reference = reference.flatten(2).transpose(1, 2)  # (R, s*s, W)
    (reference * grad_out).sum().backward()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patch_tokens.grad, patch_map.grad.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert ours[3].abs().sum() == 0  # a box wholly outside the frame reads nothing


def test_roi_align_in_bf16_reads_each_box_from_its_own_frame_beyond_256_frames():
    """300 frames with neighbouring frames labelled apart: bf16 regions stay within 1% of their frame's label."""
    config = load_config("tiny").model
    tokens = STOAVLP(config).object_tokens
    frames, patches = 300, tokens.grid**2
    labels = (torch.arange(frames) % 5 + 1).float()
    patch_tokens = labels[:, None, None].expand(frames, patches, 2)
    boxes = torch.tensor([8.0, 8.0, 40.0, 40.0]).expand(1, frames, 1, 4)  # one box per frame
    regions = tokens.regions(patch_tokens.to(torch.bfloat16), boxes)  # (frames, s*s, 2)
    assert regions.dtype == torch.bfloat16
    torch.testing.assert_close(regions.float().amax(dim=(1, 2)), labels, atol=0, rtol=0.01)


def test_patch_embedding_is_the_strided_convolution():
    config = load_config("tiny").model
    tower = STOAVLP(config).visual
    images = torch.randn(3, 3, config.image_size, config.image_size)
    expected = F.conv2d(images, tower.conv1.weight, stride=config.patch_size).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tower.patch_embed(images), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="built for 64 px frames, got 48x64"):
        tower.patch_embed(images[:, :, :48])
