"""The compiled pre-training step: one set of graphs for every batch, broken only where the costs go to the host
and where the matches come back."""

import torch
from torch._dynamo.utils import counters

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.objectives import OBJECTIVES, Pretrainer


def test_compiled_step_compiles_once_and_breaks_only_for_the_host_matching():
    config = tiny_config()
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    compiled = torch.compile(pretrainer, backend="eager", dynamic=False)  # dynamo only: no C++ toolchain needed
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for seed in range(3):  # different boxes, captions and draws: other member and pair counts
        batch = make_batch(config, seed=seed)
        torch.manual_seed(seed)
        got = compiled(batch)
        got["loss"].backward()
        torch.manual_seed(seed)
        expected = pretrainer(batch)
        for name in ("loss", *OBJECTIVES):
            torch.testing.assert_close(got[name], expected[name], msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 2  # nothing recompiled after the first step
    breaks = list(counters["graph_break"])
    assert breaks and all(("costs_to_host" in r) or ("matched_columns" in r) for r in breaks), breaks
