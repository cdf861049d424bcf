"""Video captioning with the fusion encoder in prefix-LM mode (no separate decoder).

Fine-tuning: next-token cross-entropy over every caption token after the start token, end token
included (the PLM objective with its suffix start fixed at 1). Decoding: greedy or beam search
(`stoa_vlp.tasks.decoding`) where each step re-encodes the prefix with the causal text tower and
reads the LM head at the last text position of a prefix-mode fusion pass. The start token is never
generated; a caption ends at the end token or after `max_tokens` generated tokens.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm import tqdm

from stoa_vlp.batch import Batch
from stoa_vlp.metrics.captioning import CaptionScorer
from stoa_vlp.objectives.plm import plm_loss
from stoa_vlp.tasks.decoding import Hypothesis, StepFunction, beam_search, greedy_decode
from stoa_vlp.tasks.retrieval import encode_videos, require_one_clip_per_video
from stoa_vlp.tokenizer import Tokenizer


def caption_loss(model, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of the batch's captions given their videos."""
    video, text = model(batch)
    starts = torch.ones(len(batch), dtype=torch.long, device=batch.tokens.device)
    return plm_loss(model, video, text.tokens, batch.text_mask, batch.tokens, starts)


def caption_step(model, videos, start_id: int) -> StepFunction:
    """Step function over prefixes for the videos `videos` (VideoFeatures); bans the start token."""

    def step(prefixes: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(prefixes, dtype=torch.bool)
        text = model.encode_text(prefixes, mask)
        fused = model.fuse(videos.index_select(items), text.tokens, mask, mode="prefix")
        log_probs = torch.log_softmax(model.lm_logits(fused.text[:, -1]).float(), dim=-1)  # (R, V)
        log_probs[:, start_id] = float("-inf")
        return log_probs

    return step


@torch.no_grad()
def generate_captions(
    model,
    videos,
    tokenizer: Tokenizer,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_tokens: int | None = None,
) -> list[str]:
    """Captions for VideoFeatures `videos` (B clips); greedy when beam_size == 1.

    max_tokens: generated tokens (end token included), default model.config.text_len - 1.
    """
    was_training = model.training
    model.eval()
    max_tokens = max_tokens or model.config.text_len - 1
    if max_tokens + 1 > model.config.text_len:
        raise ValueError(f"max_tokens {max_tokens} + start token exceeds model.text_len {model.config.text_len}")
    step = caption_step(model, videos, tokenizer.sot_id)
    device = videos.video.device
    count = videos.video.shape[0]
    if beam_size == 1:
        hypotheses: list[Hypothesis] = greedy_decode(step, count, tokenizer.sot_id, tokenizer.eot_id, max_tokens, device)
    else:
        hypotheses = beam_search(
            step, count, tokenizer.sot_id, tokenizer.eot_id, max_tokens, beam_size, length_penalty, device
        )
    model.train(was_training)
    return [tokenizer.decode(h.tokens) for h in hypotheses]


def evaluate_captioning(
    model,
    loader: Iterable[Batch],
    device,
    references: dict[str, list[str]],
    scorer: CaptionScorer,
    tokenizer: Tokenizer,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_tokens: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """Caption every unique video of `loader` and score against `references` ({video_id: captions}).

    Returns (metrics, {video_id: generated caption}). With `progress`, tqdm bars on stderr.
    """
    ids, videos = encode_videos(model, loader, device, progress)
    require_one_clip_per_video(ids, "captioning")
    missing = [video_id for video_id in ids if video_id not in references]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} videos (first: {missing[:5]})")
    predictions: dict[str, str] = {}
    for start in tqdm(range(0, len(ids), batch_size), desc="captioning", unit="batch", disable=not progress):
        index = torch.arange(start, min(start + batch_size, len(ids)), device=videos.video.device)
        captions = generate_captions(model, videos.index_select(index), tokenizer, beam_size, length_penalty, max_tokens)
        predictions.update(zip(ids[start : start + batch_size], captions))
    metrics = scorer.score(predictions, {video_id: references[video_id] for video_id in ids})
    metrics["num_videos"] = float(len(ids))
    return metrics, predictions


class CaptioningModule(torch.nn.Module):
    """The Trainer's module for caption fine-tuning: `forward(batch)` -> {"loss", "plm"}."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        loss = caption_loss(self.model, batch)
        return {"loss": loss, "plm": loss.detach()}
