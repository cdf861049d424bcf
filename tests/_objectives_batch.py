"""A hand-built synthetic Batch and the tiny model for the objectives tests."""

import torch

from stoa_vlp.batch import TAG_NONE, TAG_NOUN, TAG_VERB, Batch
from stoa_vlp.config import load_config
from stoa_vlp.model import STOAVLP

START_ID, END_ID = 49406, 49407


def tiny_config(*overrides: str):
    return load_config("tiny", list(overrides))


def tiny_model(config, seed: int = 0) -> STOAVLP:
    torch.manual_seed(seed)
    return STOAVLP(config.model)


def make_batch(config, video_index=(0, 0, 1, 2), seed: int = 0, no_detections=(2,)) -> Batch:
    """Random uint8 frames and captions; rows with equal video_index share their frames and boxes.

    Clips listed in `no_detections` have no boxes (all trajectories padded). Captions have 3 to 10
    words with noun/verb tags; one caption has neither nouns nor verbs.
    """
    model = config.model
    generator = torch.Generator().manual_seed(seed)
    videos = sorted(set(video_index))
    size, frames, boxes_per_frame = len(video_index), model.frames, model.boxes_per_frame
    pixels = (len(videos), frames, 3, model.image_size, model.image_size)
    clip_frames = torch.randint(0, 256, pixels, dtype=torch.uint8, generator=generator)  # as the data pipeline gives them
    corner = torch.rand(len(videos), frames, boxes_per_frame, 2, generator=generator) * model.image_size * 0.6
    extent = 8 + torch.rand(len(videos), frames, boxes_per_frame, 2, generator=generator) * model.image_size * 0.3
    clip_boxes = torch.cat([corner, corner + extent], dim=-1)
    clip_labels = torch.randint(1, 4, (len(videos), frames, boxes_per_frame), generator=generator)
    clip_box_mask = torch.rand(len(videos), frames, boxes_per_frame, generator=generator) < 0.6
    for clip in no_detections:
        if clip < len(videos):
            clip_box_mask[clip] = False
    clip_labels = clip_labels * clip_box_mask
    traj_labels = torch.zeros(len(videos), model.trajectories, dtype=torch.long)
    for clip in range(len(videos)):
        present = clip_labels[clip][clip_box_mask[clip]]
        counts = torch.bincount(present, minlength=4)[1:]
        ranked = [label + 1 for label in counts.argsort(descending=True).tolist() if counts[label] > 0]
        ranked = ranked[: model.trajectories]
        traj_labels[clip, : len(ranked)] = torch.tensor(ranked, dtype=torch.long)

    length = model.text_len
    tokens = torch.zeros(size, length, dtype=torch.long)
    pos_tags = torch.full((size, length), TAG_NONE, dtype=torch.long)
    text_mask = torch.zeros(size, length, dtype=torch.bool)
    for row in range(size):
        words = int(torch.randint(3, 11, (1,), generator=generator))
        tokens[row, 0] = START_ID
        tokens[row, 1 : 1 + words] = torch.randint(1, START_ID, (words,), generator=generator)
        tokens[row, 1 + words] = END_ID
        text_mask[row, : words + 2] = True
        if row != 1:  # caption 1 has neither nouns nor verbs: the sentence feature is the only target
            pos_tags[row, 1 : 1 + words] = torch.tensor([TAG_NOUN, TAG_VERB, TAG_NONE] * 4)[:words]

    clip_of_row = torch.tensor([videos.index(v) for v in video_index])
    return Batch(
        frames=clip_frames[clip_of_row],
        boxes=clip_boxes[clip_of_row],
        box_labels=clip_labels[clip_of_row],
        box_mask=clip_box_mask[clip_of_row],
        traj_labels=traj_labels[clip_of_row],
        traj_mask=traj_labels[clip_of_row] > 0,
        tokens=tokens,
        text_mask=text_mask,
        pos_tags=pos_tags,
        video_index=torch.tensor(video_index),
        video_ids=[f"video{v}" for v in video_index],
    )
