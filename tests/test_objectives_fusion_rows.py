"""One stacked fusion call (VTM, MLM and PLM rows, mode per row) equals each objective's rows fused alone."""

import pytest
import torch

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.objectives.fusion_rows import FusionRows, fuse_rows, fuse_together


def test_stacked_rows_with_mixed_modes_equal_separate_passes():
    config = tiny_config()
    model = tiny_model(config)
    batch = make_batch(config)
    video, text = model(batch)
    shuffled = torch.tensor([2, 0, 3, 1])
    requests = [
        FusionRows(video, text.tokens, text.mask, prefix=False),
        FusionRows(video.index_select(shuffled), text.tokens, text.mask, prefix=True),
        FusionRows(video, text.tokens.flip(1), text.mask, prefix=False),
    ]
    together = fuse_together(model, requests)
    assert len(together) == 3
    for rows, got in zip(requests, together):
        expected = fuse_rows(model, rows)
        for name in ("hidden", "video_sep", "text", "sentence"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-6, rtol=1e-5, msg=name)
    # the modes really differ: the prefix rows' text would change if fused bidirectionally
    bidirectional = fuse_rows(model, FusionRows(requests[1].video, text.tokens, text.mask, prefix=False))
    assert not torch.allclose(bidirectional.text, together[1].text, atol=1e-4)


def test_an_unknown_mode_string_is_rejected():
    config = tiny_config()
    model = tiny_model(config)
    video, text = model(make_batch(config))
    with pytest.raises(ValueError, match="bidirectional.*bool tensor"):
        model.fuse(video, text.tokens, text.mask, mode="causal")
