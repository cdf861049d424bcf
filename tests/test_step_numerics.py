"""The optimised pre-training step against a plain reference step in fp32: same losses and gradients.

The reference, written here, is the step's earlier variable-length formulation: one unpadded
sequence per trajectory, a materialised causal mask in the text tower, MLM/PLM logits only at the
gathered target rows, VTM negatives from torch.multinomial, video ids from torch.unique, and the
DOTA/STASP MSE over the gathered list of matched pairs. Both steps draw the same random numbers in
the same order from the same seed.
"""

import pytest
import torch
import torch.nn.functional as F

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.batch import TAG_NOUN, TAG_VERB
from stoa_vlp.model.stoa import TextFeatures, VideoFeatures, end_positions
from stoa_vlp.objectives import OBJECTIVES, Pretrainer
from stoa_vlp.objectives.matching import AlignmentTask, alignment_costs, hungarian_on_host, text_candidates
from stoa_vlp.objectives.mlm import MASK_INPUT_ID, word_positions
from stoa_vlp.objectives.plm import sample_suffix_starts, scored_positions
from stoa_vlp.objectives.vtc import ContrastiveEmbeddings, clamped_scale, video_embedding, vtc_loss
from stoa_vlp.objectives.vtm import vtm_loss

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def reference_mlm_positions(text_mask, probability):
    words = word_positions(text_mask)
    masked = words & (torch.rand(words.shape) < probability)
    scores = torch.rand(words.shape).masked_fill(~words, -1.0)
    fallback = F.one_hot(scores.argmax(dim=1), words.shape[1]).bool() & words
    return masked | (fallback & ~masked.any(dim=1, keepdim=True))


def reference_trajectories(encoder, object_tokens, batch):
    """One unpadded [CLS; member tokens] sequence per (clip, category), looped."""
    rows = []
    for b in range(object_tokens.shape[0]):
        for n in range(batch.traj_labels.shape[1]):
            member = batch.box_mask[b] & (batch.box_labels[b] == batch.traj_labels[b, n]) & batch.traj_mask[b, n]
            sequence = torch.cat([encoder.cls_embedding[None], object_tokens[b][member]])[None]
            rows.append(encoder.ln(encoder.transformer(sequence)[0, 0]) @ encoder.proj)
    return torch.stack(rows).reshape(object_tokens.shape[0], batch.traj_labels.shape[1], -1)


def reference_video(model, batch):
    tower = model.visual(batch.frames)
    object_tokens = model.object_tokens(tower.object_tap, batch.boxes, batch.box_labels, batch.box_mask)
    trajectories = reference_trajectories(model.trajectory_encoder, object_tokens, batch)
    actions = model.action_encoder(tower.action_tap, object_tokens, batch.box_mask)
    return VideoFeatures(tower.frames, tower.frames.mean(dim=1), trajectories, batch.traj_mask, actions)


def reference_text(model, tokens, text_mask):
    """(token features (B, L, E), sentence features (B, E)) with an explicit lower-triangular mask."""
    text = model.text
    length = tokens.shape[1]
    x = text.token_embedding(tokens) + text.positional_embedding[:length]
    x = text.transformer(x, torch.ones(length, length, dtype=torch.bool).tril())
    features = text.ln_final(x) @ text.text_projection
    return features, features[torch.arange(features.shape[0]), end_positions(text_mask)]


def reference_negatives(similarity, positives):
    has_negative = ~positives.all(dim=1)
    logits = similarity.masked_fill(positives, float("-inf")).masked_fill(~has_negative[:, None], 0.0)
    return torch.multinomial(torch.softmax(logits, dim=1), 1).squeeze(1), has_negative


def reference_alignment(tasks):
    """MSE over the gathered list of matched pairs, one Hungarian call per task."""
    losses = []
    for task in tasks:
        pairs = torch.from_numpy(hungarian_on_host(alignment_costs(task, "dot").numpy()))
        if pairs.shape[0] == 0:
            losses.append(task.predictions.sum() * 0.0)
            continue
        predicted = task.predictions[pairs[:, 0], pairs[:, 1]]
        target = task.targets[pairs[:, 0], pairs[:, 2]]
        losses.append((predicted - target).pow(2).mean(dim=1).mean())
    return losses


def reference_step(model, batch, loss_config):
    losses = {}
    mlm_positions = reference_mlm_positions(batch.text_mask, loss_config.mlm_probability)
    video = reference_video(model, batch)
    masked_ids = batch.tokens.masked_fill(mlm_positions, MASK_INPUT_ID)
    features, sentences = reference_text(model, torch.cat([batch.tokens, masked_ids]), batch.text_mask.repeat(2, 1))
    size = len(batch)
    clean = TextFeatures(features[:size], sentences[:size], batch.text_mask)

    ids = torch.unique(batch.video_index, return_inverse=True)[1]
    video_embeddings = video_embedding(video.frames, video.video, loss_config.vtc_video_feature)
    text_embeddings = F.normalize(clean.sentence, dim=-1)
    embeddings = ContrastiveEmbeddings(video_embeddings, text_embeddings, ids, video_embeddings, text_embeddings, ids)
    losses["vtc"] = vtc_loss(embeddings, model.logit_scale, loss_config.local_loss)
    with torch.no_grad():
        scale = clamped_scale(model.logit_scale)
        positives = ids[:, None] == ids[None, :]
        negative_video = reference_negatives(scale * embeddings.text @ embeddings.video.T, positives)
        negative_text = reference_negatives(scale * embeddings.video @ embeddings.text.T, positives)
    losses["vtm"] = vtm_loss(model, video, clean, video, clean, negative_video, negative_text)

    masked_features = features[size:]
    fusion_text = torch.where(mlm_positions[..., None], model.mask_embedding, masked_features)
    fused = model.fuse(video, fusion_text, batch.text_mask, mode="bidirectional")
    losses["mlm"] = F.cross_entropy(model.lm_logits(fused.text[mlm_positions]), batch.tokens[mlm_positions])

    targets = scored_positions(batch.text_mask, sample_suffix_starts(batch.text_mask))
    fused = model.fuse(video, clean.tokens, batch.text_mask, mode="prefix")
    logits = model.lm_logits(fused.text[targets.roll(-1, dims=1)])
    losses["plm"] = F.cross_entropy(logits, batch.tokens[targets])

    tasks = [
        AlignmentTask(video.trajectories, video.traj_mask,
                      *text_candidates(clean.tokens, clean.sentence, batch.text_mask, batch.pos_tags, TAG_NOUN)),
        AlignmentTask(video.actions, torch.ones_like(video.actions[..., 0], dtype=torch.bool),
                      *text_candidates(clean.tokens, clean.sentence, batch.text_mask, batch.pos_tags, TAG_VERB)),
    ]
    losses["dota"], losses["stasp"] = reference_alignment(tasks)
    return losses


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("video_index", [(0, 0, 1, 2), (0, 1, 2, 3)])
def test_optimised_step_matches_the_reference_step(video_index):
    config = tiny_config("loss.vtc=0.5", "loss.plm=2")
    model = tiny_model(config)
    batch = make_batch(config, video_index=video_index)
    weights = {name: getattr(config.loss, name) for name in OBJECTIVES}

    torch.manual_seed(11)
    expected = reference_step(model, batch, config.loss)
    sum(weights[name] * expected[name] for name in OBJECTIVES).backward()
    expected_gradients = gradients(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(11)
    got = Pretrainer(model, config.loss)(batch)
    got["loss"].backward()
    got_gradients = gradients(model)

    for name in OBJECTIVES:
        torch.testing.assert_close(got[name], expected[name].detach(), **TOLERANCE, msg=name)
    assert expected["dota"] > 0 and expected["stasp"] > 0 and expected["mlm"] > 0  # every term is exercised
    assert got_gradients.keys() == expected_gradients.keys()
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(got_gradients[name], gradient, **TOLERANCE, msg=name)
