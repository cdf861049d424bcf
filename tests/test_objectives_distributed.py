"""Two gloo ranks equal one rank on the concatenated batch: VTC (with and without local_loss), VTM with
negatives from the other rank and more valid pairs on one rank than on the other, a mean over terms
all on one rank (`global_mean`, as MLM, PLM, DOTA and STASP take theirs), and the row gather itself.
Loss and parameter gradients, 1e-6 in fp32; ranks average their gradients as DDP does."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stoa_vlp.objectives.distributed import gather_features, global_mean
from stoa_vlp.objectives.vtc import ContrastiveEmbeddings, video_embedding, vtc_loss
from stoa_vlp.objectives.vtm import vtm_loss

# 8 captions, two ranks of 4; repeats within a rank (10, 12) and across the ranks (3)
GLOBAL_INDEX = torch.tensor([10, 10, 3, 7, 11, 12, 12, 3])
# VTM draws fixed here (global rows); rank 0 has 9 valid pairs, rank 1 has 12 (every negative)
NEGATIVE_VIDEO = (torch.tensor([5, 6, 0, 2, 1, 3, 0, 7]), torch.tensor([1, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool))
NEGATIVE_TEXT = (torch.tensor([4, 2, 7, 0, 3, 1, 5, 6]), torch.tensor([1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool))
# the terms of the "mean" objective: three on rank 0, none on rank 1 (a rank without detections in DOTA)
TERMS = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)


@dataclass
class Clip:  # the VideoFeatures fields VTM moves around
    frames: torch.Tensor  # (B, T, E)
    video: torch.Tensor  # (B, E)
    traj_mask: torch.Tensor  # (B, N) bool


@dataclass
class Caption:  # the TextFeatures fields
    tokens: torch.Tensor  # (B, L, E)
    mask: torch.Tensor  # (B, L) bool


class PairScorer(torch.nn.Module):
    """Stands in for the model in vtm_loss: `fuse` mixes a clip and a caption, `match_logits` scores it."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(6, 2)

    def fuse(self, video: Clip, text_tokens, text_mask, mode):
        assert mode == "bidirectional"
        text = (text_tokens * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)  # (P, E)
        trajectories = video.traj_mask.float().mean(1, keepdim=True)  # (P, 1)
        return torch.cat([video.video * text, trajectories * text], dim=-1)  # (P, 6)

    def match_logits(self, fused):
        return self.head(fused)


def build_problem():
    """Fixed inputs and small trainable parts: frames (8, 3, 6), captions (8, 5, 6)."""
    generator = torch.Generator().manual_seed(5)
    frames = torch.randn(8, 3, 6, generator=generator)
    captions = torch.randn(8, 5, 6, generator=generator)
    text_mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 4, 2, 5, 4, 3, 5])[:, None]
    traj_mask = torch.rand(8, 4, generator=generator) < 0.5
    torch.manual_seed(6)
    parts = torch.nn.ModuleDict({"video": torch.nn.Linear(6, 3), "text": torch.nn.Linear(6, 3), "pair": PairScorer()})
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return frames, captions, text_mask, traj_mask, parts, logit_scale


def loss_and_gradients(rows: slice, objective: str):
    frames, captions, text_mask, traj_mask, parts, logit_scale = build_problem()
    video_frames = parts["video"](frames[rows])  # (B, T, 3)
    text_tokens = parts["text"](captions[rows])  # (B, L, 3)
    if objective == "vtm":
        video = Clip(video_frames, video_frames.mean(1), traj_mask[rows])
        text = Caption(text_tokens, text_mask[rows])
        negative_video = tuple(part[rows] for part in NEGATIVE_VIDEO)
        negative_text = tuple(part[rows] for part in NEGATIVE_TEXT)
        all_video, all_text = gather_features(video), gather_features(text)
        loss = vtm_loss(parts["pair"], video, text, all_video, all_text, negative_video, negative_text)
    elif objective == "mean":
        terms = video_frames.pow(2).mean(dim=(1, 2))  # (B,)
        weights = TERMS[rows].float()
        loss = global_mean((terms * weights).sum(), weights.sum())
    else:
        embeddings = ContrastiveEmbeddings.gather(
            video_embedding(video_frames, video_frames.mean(1), "mean"),
            F.normalize(text_tokens[:, 0], dim=-1),
            GLOBAL_INDEX[rows],
        )
        loss = vtc_loss(embeddings, logit_scale, local_loss=objective == "vtc_local")
    loss.backward()
    parameters = [*parts.parameters(), logit_scale]
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]


OBJECTIVES = ("vtc", "vtc_local", "vtm", "mean")


def rank_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    rows = slice(4 * rank, 4 * rank + 4)
    for objective in OBJECTIVES:
        loss, gradients = loss_and_gradients(rows, objective)
        dist.all_reduce(loss)  # the global loss is the mean of the rank losses
        for gradient in gradients:
            dist.all_reduce(gradient)  # DDP averages gradients over ranks
        results[objective] = (loss / 2, [gradient / 2 for gradient in gradients])
    # gathered rows (float with gradient, bool without) equal the concatenation in rank order
    values = torch.arange(8.0).reshape(2, 4)[rank].clone().requires_grad_()
    gathered = gather_features(Caption(values, torch.tensor([rank == 0, True, False, rank == 1])))
    (gathered.tokens * torch.arange(8.0)).sum().backward()
    results["gather"] = (gathered.tokens.detach(), gathered.mask, values.grad)
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_rank_on_the_whole_batch(tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.spawn(rank_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    results = torch.load(out_file)
    for objective in OBJECTIVES:
        expected_loss, expected_gradients = loss_and_gradients(slice(0, 8), objective)
        loss, gradients = results[objective]
        torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6, msg=objective)
        assert any(gradient.abs().sum() > 0 for gradient in expected_gradients)
        for gradient, expected in zip(gradients, expected_gradients):
            torch.testing.assert_close(gradient, expected, atol=1e-6, rtol=1e-6, msg=objective)
    tokens, mask, gradient = results["gather"]
    torch.testing.assert_close(tokens, torch.arange(8.0))
    assert mask.tolist() == [True, True, False, False, False, True, False, True]
    torch.testing.assert_close(gradient, torch.arange(4.0) * 2)  # both ranks' gradients for rank 0's rows
