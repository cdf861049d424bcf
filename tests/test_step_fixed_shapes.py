"""The eager pre-training step has fixed shapes: no host sync but the matching, capped trajectories exact."""

import math
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.model import objects
from stoa_vlp.objectives import Pretrainer, matching, pretrainer as pretrainer_module
from stoa_vlp.objectives.distributed import global_video_index

aten = torch.ops.aten
# ops whose output size or result the host must read from the device (each is a sync on CUDA);
# multinomial: torch versions before the asynchronous asserts check its input with .item()
SYNCING = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.multinomial.default,
}


class SyncRecorder(TorchDispatchMode):
    """Records every syncing op (and boolean-mask indexing) dispatched while not paused."""

    def __init__(self):
        super().__init__()
        self.syncs, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            bool_index = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                index is not None and index.dtype == torch.bool for index in args[1]
            )
            if func in SYNCING or bool_index:
                self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def paused_while(recorder: SyncRecorder, function):
    """`function` run with recording paused: the host parts that are allowed to sync."""

    def run(*args, **kwargs):
        recorder.paused = True
        try:
            return function(*args, **kwargs)
        finally:
            recorder.paused = False

    return run


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("loss.fusion_stop_gradient=true", "loss.local_loss=true", "loss.vtc_video_feature=sep",
         "loss.match_similarity=cosine", "model.trajectory_length=3"),
        ("model.objects=false", "loss.dota=0", "model.grad_checkpointing=true"),
    ],
)
def test_the_full_step_syncs_only_in_the_label_check_and_the_matching(overrides):
    config = tiny_config(*overrides)
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    batch = make_batch(config)
    recorder = SyncRecorder()
    labels = objects.ObjectTokens.check_labels
    with mock.patch.object(
        objects.ObjectTokens, "check_labels", lambda self, x: paused_while(recorder, labels)(self, x)
    ), mock.patch.object(
        pretrainer_module, "matched_columns", wraps=paused_while(recorder, matching.matched_columns)
    ) as host:
        with recorder:
            losses = pretrainer(batch)
            losses["loss"].backward()
    assert host.call_count == 1
    assert recorder.syncs == []
    assert torch.isfinite(losses["loss"])


def test_evenly_spaced_members_keep_the_first_and_last():
    counts = torch.tensor([[7, 10], [4, 5]])
    torch.testing.assert_close(
        objects.evenly_spaced_members(counts, 3),
        torch.tensor([[[0, 3, 6], [0, 5, 9]], [[0, 2, 3], [0, 2, 4]]]),  # 4.5 and 1.5 round half up
    )
    torch.testing.assert_close(objects.evenly_spaced_members(counts, 1), torch.tensor([[[3], [4]], [[1], [2]]]))


def evenly_spaced(count: int, cap: int) -> list[int]:
    if cap == 1:
        return [(count - 1) // 2]
    return [math.floor(s * (count - 1) / (cap - 1) + 0.5) for s in range(cap)]


@pytest.mark.parametrize("cap", [1, 3, 5])
def test_capped_trajectories_keep_evenly_spaced_boxes(cap):
    config = tiny_config(f"model.trajectory_length={cap}")
    model = tiny_model(config).eval()
    batch = make_batch(config, no_detections=())
    encoder = model.trajectory_encoder
    with torch.no_grad():
        tower = model.visual(batch.frames)
        tokens = model.object_tokens(tower.object_tap, batch.boxes, batch.box_labels, batch.box_mask)
        capped = encoder(tokens, batch.box_labels, batch.box_mask, batch.traj_labels, batch.traj_mask)
        truncated = 0
        for b in range(tokens.shape[0]):
            for n in range(batch.traj_labels.shape[1]):
                if not batch.traj_mask[b, n]:
                    continue
                member = batch.box_mask[b] & (batch.box_labels[b] == batch.traj_labels[b, n])
                member_tokens = tokens[b][member]  # (count, W) in frame order
                count = member_tokens.shape[0]
                if count > cap:
                    truncated += 1
                    member_tokens = member_tokens[evenly_spaced(count, cap)]
                sequence = torch.cat([encoder.cls_embedding[None], member_tokens])[None]
                expected = encoder.ln(encoder.transformer(sequence)[0, 0]) @ encoder.proj
                torch.testing.assert_close(capped[b, n], expected, atol=1e-5, rtol=1e-5)
    assert truncated > 0  # the cap was exercised


def test_a_cap_at_or_above_t_times_k_is_the_exact_encoder():
    exact_config = tiny_config()
    total = exact_config.model.frames * exact_config.model.boxes_per_frame
    large_config = tiny_config(f"model.trajectory_length={total + 5}")
    batch = make_batch(exact_config)
    outputs = []
    for config in (exact_config, large_config):
        model = tiny_model(config).eval()
        with torch.no_grad():
            video = model.encode_video(
                batch.frames, batch.boxes, batch.box_labels, batch.box_mask, batch.traj_labels, batch.traj_mask
            )
        outputs.append(video.trajectories)
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


def test_negative_trajectory_length_is_rejected():
    with pytest.raises(ValueError, match="model.trajectory_length must be >= 0"):
        tiny_model(tiny_config("model.trajectory_length=-1"))


def test_global_video_ids_are_the_datasets_ids():
    ids = torch.tensor([7, 3, 7, 9, 3])
    local, everything = global_video_index(ids)  # one rank: the gather is the identity
    assert torch.equal(local, ids) and torch.equal(everything, ids)


def alignment_tasks(seed: int):
    """Two tasks with random validity masks (so the number of matched pairs varies with the seed)."""
    generator = torch.Generator().manual_seed(seed)
    batch, rows, candidates, width = 3, 4, 6, 8
    tasks = []
    for _ in range(2):
        predictions = torch.randn(batch, rows, width, generator=generator, requires_grad=True)
        prediction_mask = torch.rand(batch, rows, generator=generator) < 0.6
        target_mask = torch.rand(batch, candidates, generator=generator) < 0.5
        targets = torch.randn(batch, candidates, width, generator=generator)
        tasks.append(matching.AlignmentTask(predictions, prediction_mask, targets, target_mask))
    return tasks


def test_compiled_alignment_does_not_recompile_when_the_pair_count_changes():
    compiled = torch.compile(matching.alignment_losses, backend="eager", dynamic=False)
    pair_counts = set()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(4):
            tasks = alignment_tasks(seed)
            costs = torch.cat([matching.alignment_costs(task, "dot") for task in tasks])
            columns = matching.matched_columns(matching.costs_to_host(costs), costs.device)
            pair_counts.add(int((columns >= 0).sum()))
            for got, expected in zip(compiled(tasks, "dot"), matching.alignment_losses(tasks, "dot")):
                torch.testing.assert_close(got, expected)
    assert len(pair_counts) > 1
