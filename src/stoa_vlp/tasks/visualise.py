"""What the model sees in one clip and which caption words its objects and actions stand for.

`explain_clip` takes one clip with one caption (a Batch of one row, as the evaluation loaders give it)
and computes:
- the contrastive cosine of the pair and the matching head's probability that they match;
- the Hungarian matching of the clip's trajectories to the caption's nouns and of its action queries
  to the caption's verbs, as DOTA and STASP match them in pre-training (the same costs,
  `loss.match_similarity`; the sentence feature is a candidate too), each matched pair with its cosine.
  Without noun/verb tags every word token is a candidate of both.
It also keeps where each action query looks: its spatial attention over every frame's patches and
object tokens (`ActionEncoder.spatial_attention`).
`render` draws the frames the model sees, with each box coloured by its trajectory (torchvision's
`draw_bounding_boxes`), one row per action query with its attention over the patches as a heat map,
and a panel that lists the caption, the scores and the matches, as a PNG.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from stoa_vlp.batch import TAG_NOUN, TAG_VERB, Batch
from stoa_vlp.model.towers import CLIP_MEAN, CLIP_STD
from stoa_vlp.objectives.matching import AlignmentTask, alignment_costs, hungarian_on_host, text_candidates
from stoa_vlp.objectives.mlm import word_positions
from stoa_vlp.tasks.retrieval import contrastive_similarity

SENTENCE = "<sentence>"
OTHER_BOX_COLOUR = "#9e9e9e"  # boxes of classes outside the clip's trajectories
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#469990", "#9a6324", "#800000", "#808000", "#000075", "#fabed4", "#ffe119", "#dcbeff")


def trajectory_colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


@dataclass
class Match:
    row: int  # trajectory or action query index
    name: str  # the trajectory's object class, or "action <row>"
    word: str  # the caption word of the matched token, or SENTENCE for the caption's sentence feature
    position: int  # the word's token position; -1 for the sentence feature
    cosine: float


@dataclass
class Box:
    frame: int
    rect: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the model's input frame
    name: str  # object class
    trajectory: int  # index of the trajectory of its class, -1 when its class has none


@dataclass
class ClipExplanation:
    video_id: str
    caption: str
    similarity: float  # contrastive cosine of clip and caption
    match_probability: float  # the matching head's P(matched)
    objects: list[Match]
    actions: list[Match]
    trajectories: list[str]  # class name of each valid trajectory, by index
    boxes: list[Box]
    tagged: bool  # False: every word was a candidate of both objects and actions
    action_object_share: list[float]  # per action query: its attention on object tokens, mean over frames
    frames: torch.Tensor = field(repr=False)  # (T, 3, S, S) uint8: the frames as the model sees them
    action_attention: torch.Tensor = field(repr=False)  # (T, M, g, g) float: each query's weights on the patches

    def to_json(self) -> dict:
        """Everything but the frames and attention maps, as JSON-ready values."""
        return {key: value for key, value in asdict(self).items() if key not in ("frames", "action_attention")}


def token_words(tokens: list[int], tokenizer) -> list[str]:
    """The whole word each token position belongs to (a word may be several BPE pieces, the last one
    marked by "</w>"); "" at the start token, the end token and padding."""
    words = [""] * len(tokens)
    pieces: list[int] = []  # positions of the word being read

    def close_word() -> None:
        word = tokenizer.decode([tokens[position] for position in pieces])
        for position in pieces:
            words[position] = word
        pieces.clear()

    for position, token in enumerate(tokens):
        if token == tokenizer.eot_id:
            break
        if token == tokenizer.sot_id:
            continue
        pieces.append(position)
        if tokenizer.bpe.decoder[token].endswith("</w>"):
            close_word()
    if pieces:  # a caption cut inside a word
        close_word()
    return words


def input_frames(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, S, S) uint8 images of a clip's input frames: uint8 frames (the data pipeline's) as they
    are, CLIP-normalised float frames mapped back to pixels."""
    if frames.dtype == torch.uint8:
        return frames.cpu()
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (frames.float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)


def _matches(predictions: torch.Tensor, prediction_mask: torch.Tensor, text, tags: torch.Tensor, tag: int,
             similarity: str, names: list[str], words: list[str]) -> list[Match]:
    """The Hungarian matches, in row order, of one clip's predictions (1, R, E) with the caption's
    tokens tagged `tag` (1, L) and its sentence feature, as DOTA/STASP match them."""
    targets, target_mask = text_candidates(text.tokens, text.sentence, text.mask, tags, tag)
    task = AlignmentTask(predictions, prediction_mask, targets, target_mask)
    costs = alignment_costs(task, similarity).cpu()  # (1, R, C)
    predictions = F.normalize(task.predictions[0].float(), dim=-1)
    targets = F.normalize(task.targets[0].float(), dim=-1)
    matches = []
    for _, row, column in sorted(hungarian_on_host(costs.numpy()).tolist(), key=lambda pair: pair[1]):
        sentence = column == len(words)
        matches.append(Match(
            row=row,
            name=names[row],
            word=SENTENCE if sentence else words[column],
            position=-1 if sentence else column,
            cosine=float(predictions[row] @ targets[column]),
        ))
    return matches


@torch.no_grad()
def explain_clip(model, batch: Batch, caption: str, tokenizer, label_vocab=None, pos_tags: torch.Tensor | None = None,
                 similarity: str = "dot", video_feature: str = "mean") -> ClipExplanation:
    """The explanation of a one-row `batch` (clip and tokenised `caption`); pos_tags (1, L) noun/verb tags of
    the caption, or None; label_vocab names the object classes (else their ids are shown)."""
    if len(batch) != 1:
        raise ValueError(f"explain_clip takes a batch of one clip and caption, got {len(batch)} rows")
    was_training = model.training
    model.eval()
    action_inputs = []  # (tap, object tokens, box mask) of the action encoder's call
    hook = None
    if model.action_encoder is not None:
        hook = model.action_encoder.register_forward_hook(lambda module, inputs, output: action_inputs.append(inputs))
    try:
        video, text = model(batch)
        fused = model.fuse(video, text.tokens, text.mask, mode="bidirectional")
        probability = torch.softmax(model.match_logits(fused).float(), dim=-1)[0, 1]
        attention = action_attention(model, *action_inputs[0]) if action_inputs else None
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    words = token_words(batch.tokens[0].tolist(), tokenizer)
    if pos_tags is None:
        word_tokens = word_positions(batch.text_mask)
        noun_tags, verb_tags = word_tokens * TAG_NOUN, word_tokens * TAG_VERB
    else:
        noun_tags = verb_tags = pos_tags.to(batch.tokens.device)
    name_of = label_vocab.name if label_vocab is not None else str
    labels, valid = batch.traj_labels[0].tolist(), batch.traj_mask[0].tolist()
    names = [name_of(label) for label in labels]
    objects = actions = []
    if video.trajectories.shape[1]:
        objects = _matches(video.trajectories, video.traj_mask, text, noun_tags, TAG_NOUN, similarity, names, words)
    if video.actions.shape[1]:
        every_query = torch.ones_like(video.actions[..., 0], dtype=torch.bool)
        queries = [f"action {row}" for row in range(video.actions.shape[1])]
        actions = _matches(video.actions, every_query, text, verb_tags, TAG_VERB, similarity, queries, words)
    trajectory_of = {label: row for row, (label, ok) in enumerate(zip(labels, valid)) if ok}
    boxes = []
    for frame, slot in batch.box_mask[0].nonzero().tolist():
        label = int(batch.box_labels[0, frame, slot])
        boxes.append(Box(frame, tuple(batch.boxes[0, frame, slot].tolist()), name_of(label), trajectory_of.get(label, -1)))
    return ClipExplanation(
        video_id=batch.video_ids[0],
        caption=caption,
        similarity=float(contrastive_similarity(video, text, video_feature)[0, 0]),
        match_probability=float(probability),
        objects=objects,
        actions=actions,
        trajectories=[name for name, ok in zip(names, valid) if ok],
        boxes=boxes,
        tagged=pos_tags is not None,
        action_object_share=[] if attention is None else attention[1].tolist(),
        frames=input_frames(batch.frames[0]),
        action_attention=torch.zeros(0) if attention is None else attention[0],
    )


def action_attention(model, tap: torch.Tensor, object_tokens, box_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(each query's weights on the patches (T, M, g, g), its mean share on object tokens (M,)) of the
    first clip, from the action encoder's inputs."""
    weights, _ = model.action_encoder.spatial_attention(tap, object_tokens, box_mask)  # (B, T, M, P+K)
    patches = tap.shape[2] - 1
    grid = math.isqrt(patches)
    weights = weights[0].cpu()
    return weights[..., :patches].reshape(*weights.shape[:2], grid, grid), weights[..., patches:].sum(-1).mean(0)


def panel_lines(explanation: ClipExplanation) -> list[tuple[str, str]]:
    """(text, colour) lines of the panel under the frames."""
    lines = [
        (f"caption: {explanation.caption}", "black"),
        (f"contrastive cosine {explanation.similarity:.3f}   match probability {explanation.match_probability:.3f}",
         "black"),
    ]
    kinds = ("nouns", "verbs") if explanation.tagged else ("words", "words")
    if explanation.objects:
        lines.append((f"trajectories -> caption {kinds[0]} (Hungarian, as DOTA):", "black"))
        lines += [(f"  {m.name} -> {m.word}  (cosine {m.cosine:.2f})", trajectory_colour(m.row))
                  for m in explanation.objects]
    if explanation.actions:
        lines.append((f"action queries -> caption {kinds[1]} (Hungarian, as STASP); the rows under the frames "
                      "show where each query looks:", "black"))
        shares = explanation.action_object_share
        lines += [(f"  {m.name} -> {m.word}  (cosine {m.cosine:.2f}; {100 * shares[m.row]:.0f}% of its attention on "
                   "objects)", "black") for m in explanation.actions]
    return lines


def heat_overlay(frame: torch.Tensor, heat: torch.Tensor, strength: float = 0.7) -> torch.Tensor:
    """The uint8 frame (3, H, W) tinted red where `heat` (g, g) is high (scaled to its maximum)."""
    heat = F.interpolate(heat[None, None].float(), size=frame.shape[1:], mode="nearest")[0]  # (1, H, W)
    heat = strength * heat / heat.max().clamp(min=1e-12)
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1)
    return (frame.float() * (1 - heat) + red * heat).round().to(torch.uint8)


def render(explanation: ClipExplanation, path, min_frame_size: int = 192) -> None:
    """Write a PNG: the frames (enlarged to at least `min_frame_size` px) with their boxes in one row, a row
    per action query with its attention map on each frame, then the panel."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import draw_bounding_boxes, make_grid

    frames = explanation.frames
    scale = max(1, math.ceil(min_frame_size / frames.shape[-1]))
    enlarged = F.interpolate(frames.float(), scale_factor=scale, mode="nearest").to(torch.uint8)
    drawn = []
    for index, frame in enumerate(enlarged):
        boxes = [box for box in explanation.boxes if box.frame == index]
        if boxes:
            frame = draw_bounding_boxes(
                frame,
                torch.tensor([box.rect for box in boxes]) * scale,
                labels=[box.name for box in boxes],
                colors=[trajectory_colour(box.trajectory) if box.trajectory >= 0 else OTHER_BOX_COLOUR for box in boxes],
                width=2,
            )
        drawn.append(frame)
    for query in range(explanation.action_attention.shape[1] if explanation.action_attention.numel() else 0):
        drawn += [heat_overlay(frame, explanation.action_attention[index, query])
                  for index, frame in enumerate(enlarged)]
    grid = to_pil_image(make_grid(drawn, nrow=len(enlarged), padding=4, pad_value=255))
    font = ImageFont.load_default()
    lines = panel_lines(explanation)
    line_height = 16
    text_width = max(int(ImageDraw.Draw(grid).textlength(text, font=font)) for text, _ in lines) + 16
    image = Image.new("RGB", (max(grid.width, text_width), grid.height + line_height * len(lines) + 12), "white")
    image.paste(grid, (0, 0))
    draw = ImageDraw.Draw(image)
    for number, (text, colour) in enumerate(lines):
        draw.text((8, grid.height + 6 + number * line_height), text, fill=colour, font=font)
    image.save(path)
