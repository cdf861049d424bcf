"""VTC: hand-written and open_clip references, several captions per video, temperature, video feature."""

import math

import torch
import torch.nn.functional as F

from stoa_vlp.objectives.vtc import (
    ContrastiveEmbeddings,
    multi_positive_cross_entropy,
    scaled_similarity,
    video_embedding,
    vtc_loss,
)


def reference_vtc(video: torch.Tensor, text: torch.Tensor, video_index: list[int], scale: float) -> torch.Tensor:
    """Loops: for each caption (video), minus the mean log-probability of the videos (captions) it matches."""
    video, text = F.normalize(video, dim=-1), F.normalize(text, dim=-1)
    size = len(video_index)
    text_terms, video_terms = [], []
    for i in range(size):
        positives = [j for j in range(size) if video_index[j] == video_index[i]]
        row = [scale * float(text[i] @ video[j]) for j in range(size)]
        column = [scale * float(video[i] @ text[j]) for j in range(size)]
        text_log_norm = math.log(sum(math.exp(value) for value in row))
        video_log_norm = math.log(sum(math.exp(value) for value in column))
        text_terms.append(-sum(row[j] - text_log_norm for j in positives) / len(positives))
        video_terms.append(-sum(column[j] - video_log_norm for j in positives) / len(positives))
    return torch.tensor((sum(text_terms) / size + sum(video_terms) / size) / 2)


def single_rank_loss(video, text, video_index, logit_scale, local_loss=False):
    embeddings = ContrastiveEmbeddings.gather(F.normalize(video, dim=-1), F.normalize(text, dim=-1), video_index)
    return vtc_loss(embeddings, logit_scale, local_loss)


def test_matches_hand_written_reference_with_several_captions_per_video():
    torch.manual_seed(0)
    video, text = torch.randn(6, 8), torch.randn(6, 8)
    video_index = [7, 7, 3, 9, 3, 7]  # three captions of video 7, two of video 3
    logit_scale = torch.tensor(math.log(10.0))
    for local_loss in (False, True):
        loss = single_rank_loss(video, text, torch.tensor(video_index), logit_scale, local_loss)
        torch.testing.assert_close(loss, reference_vtc(video, text, video_index, 10.0), atol=1e-5, rtol=1e-5)


def test_one_caption_per_video_equals_open_clip_clip_loss():
    from open_clip.loss import ClipLoss  # imported here so the spawned ranks need not import open_clip

    torch.manual_seed(1)
    video, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    logit_scale = torch.tensor(math.log(20.0))
    loss = single_rank_loss(video, text, torch.tensor([4, 0, 3, 1, 2]), logit_scale)
    expected = ClipLoss()(video, text, logit_scale.exp())
    torch.testing.assert_close(loss, expected)


def test_another_caption_of_the_same_video_is_pulled_closer_not_pushed_away():
    # row: caption 0 against clips [own clip, other clip of the same video, another video]
    logits = torch.tensor([[2.0, 1.0, -1.0]], requires_grad=True)
    multi_positive_cross_entropy(logits, torch.tensor([[True, True, False]])).backward()
    assert logits.grad[0, 1] < 0 and logits.grad[0, 2] > 0  # gradient descent raises logit 1
    diagonal = logits.detach().clone().requires_grad_()
    F.cross_entropy(diagonal, torch.tensor([0])).backward()
    assert diagonal.grad[0, 1] > 0  # the diagonal target would push it away


def test_temperature_is_clamped_at_100_and_then_gets_no_gradient():
    torch.manual_seed(3)
    video, text = torch.randn(4, 8), torch.randn(4, 8)
    big = torch.tensor(math.log(400.0), requires_grad=True)
    loss = single_rank_loss(video, text, torch.arange(4), big)
    torch.testing.assert_close(loss, reference_vtc(video, text, [0, 1, 2, 3], 100.0), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert big.grad == 0


def test_video_feature_mean_is_meanp_and_sep_is_the_plain_mean():
    torch.manual_seed(4)
    frames = torch.randn(2, 3, 8)
    frames[0, 0] *= 100  # meanP normalises each frame first, so one large frame does not dominate
    meanp = F.normalize(sum(F.normalize(frames[:, t], dim=-1) for t in range(3)) / 3, dim=-1)
    torch.testing.assert_close(video_embedding(frames, frames.mean(1), "mean"), meanp)
    torch.testing.assert_close(video_embedding(frames, frames.mean(1), "sep"), F.normalize(frames.mean(1), dim=-1))


def test_logits_stay_float32_under_bf16_autocast():
    """At scale 100, bf16 logits are 0.5 apart: under autocast the loss was 0.14% off and its gradient 2%
    (B = 256); the logits (and VTM's sampling similarities) are now float32 products."""
    generator = torch.Generator().manual_seed(0)
    video = F.normalize(torch.randn(64, 32, generator=generator), dim=-1)
    text = F.normalize(video + 0.6 * torch.randn(64, 32, generator=generator), dim=-1).requires_grad_()
    embeddings = ContrastiveEmbeddings(video, text, torch.arange(64), video, text, torch.arange(64))
    scale = torch.tensor(math.log(100.0))
    exact = vtc_loss(embeddings, scale, local_loss=False)
    (exact_gradient,) = torch.autograd.grad(exact, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = vtc_loss(embeddings, scale, local_loss=False)
        assert scaled_similarity(scale.exp(), text, video).dtype == torch.float32
    (mixed_gradient,) = torch.autograd.grad(mixed, text)
    torch.testing.assert_close(mixed, exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed_gradient, exact_gradient, rtol=1e-5, atol=1e-7)
