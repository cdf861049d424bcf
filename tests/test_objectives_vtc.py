"""VTC: hand-written and open_clip references, several captions per video, 2 gloo ranks = 1 rank."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stoa_vlp.objectives.distributed import gather_features
from stoa_vlp.objectives.vtc import ContrastiveEmbeddings, multi_positive_cross_entropy, video_embedding, vtc_loss


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


# --- two gloo ranks against one rank on the concatenated batch --------------------------------------


@dataclass
class Rows:
    tokens: torch.Tensor
    mask: torch.Tensor

GLOBAL_INDEX = torch.tensor([10, 10, 3, 7, 11, 12, 12, 4])  # 8 captions, two ranks of 4; repeats within a rank


def build_problem():
    """Fixed inputs and a small trainable projection: frames (8, 3, 6), captions (8, 6)."""
    generator = torch.Generator().manual_seed(5)
    frames = torch.randn(8, 3, 6, generator=generator)
    captions = torch.randn(8, 6, generator=generator)
    torch.manual_seed(6)
    projection = torch.nn.ModuleDict({"video": torch.nn.Linear(6, 5), "text": torch.nn.Linear(6, 5)})
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return frames, captions, projection, logit_scale


def loss_and_gradients(rows: slice, local_loss: bool):
    frames, captions, projection, logit_scale = build_problem()
    video_frames = projection["video"](frames[rows])
    embeddings = ContrastiveEmbeddings.gather(
        video_embedding(video_frames, video_frames.mean(1), "mean"),
        F.normalize(projection["text"](captions[rows]), dim=-1),
        GLOBAL_INDEX[rows],
    )
    loss = vtc_loss(embeddings, logit_scale, local_loss)
    loss.backward()
    parameters = [*projection.parameters(), logit_scale]
    return loss.detach(), [parameter.grad for parameter in parameters]


def rank_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    rows = slice(4 * rank, 4 * rank + 4)
    for local_loss in (False, True):
        loss, gradients = loss_and_gradients(rows, local_loss)
        dist.all_reduce(loss)  # the global loss is the mean of the rank losses
        for gradient in gradients:
            dist.all_reduce(gradient)  # DDP averages gradients over ranks
        results[local_loss] = (loss / 2, [gradient / 2 for gradient in gradients])
    # gathered rows (float with gradient, bool without) equal the concatenation in rank order
    values = torch.arange(8.0).reshape(2, 4)[rank].clone().requires_grad_()
    gathered = gather_features(Rows(values, torch.tensor([rank == 0, True, False, rank == 1])))
    (gathered.tokens * torch.arange(8.0)).sum().backward()
    results["gather"] = (gathered.tokens.detach(), gathered.mask, values.grad)
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_rank_on_the_whole_batch(tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.spawn(rank_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    results = torch.load(out_file)
    for local_loss in (False, True):
        expected_loss, expected_gradients = loss_and_gradients(slice(0, 8), local_loss)
        loss, gradients = results[local_loss]
        torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
        for gradient, expected in zip(gradients, expected_gradients):
            torch.testing.assert_close(gradient, expected, atol=1e-6, rtol=1e-6)
    tokens, mask, gradient = results["gather"]
    torch.testing.assert_close(tokens, torch.arange(8.0))
    assert mask.tolist() == [True, True, False, False, False, True, False, True]
    torch.testing.assert_close(gradient, torch.arange(4.0) * 2)  # both ranks' gradients for rank 0's rows
