"""The compiled pre-training step: one set of graphs for every batch, broken only where the costs go to the host
and where the matches come back. The fine-tuning steps of the downstream tasks: one graph, no break."""

import pytest
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


def compile_on_rank(rank: int, world_size: int, init_file: str, report: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        config = tiny_config()
        compiled = torch.compile(Pretrainer(tiny_model(config), config.loss), backend="eager", dynamic=False)
        torch._dynamo.reset()
        counters.clear()
        batch = make_batch(config, video_index=(2 * rank, 2 * rank + 1))  # ids distinct across ranks
        compiled(batch)["loss"].backward()
        if rank == 0:
            compiled_graphs = {"graphs": counters["stats"]["unique_graphs"], "breaks": list(counters["graph_break"])}
            with open(report, "w") as handle:
                json.dump(compiled_graphs, handle)
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_inside_the_compiled_graphs(tmp_path):
    """VTC and VTM gather features from every rank; those gathers are traced (functional collectives),
    so 2 ranks compile into the same graphs as 1, broken only for the host matching."""
    import json

    import torch.multiprocessing as mp

    report = tmp_path / "report.json"
    mp.spawn(compile_on_rank, args=(2, str(tmp_path / "init"), str(report)), nprocs=2, join=True)
    compiled = json.loads(report.read_text())
    assert compiled["breaks"] and all(("costs_to_host" in r) or ("matched_columns" in r) for r in compiled["breaks"])
    config = tiny_config()
    torch._dynamo.reset()
    counters.clear()
    torch.compile(Pretrainer(tiny_model(config), config.loss), backend="eager", dynamic=False)(
        make_batch(config, video_index=(0, 1)))["loss"].backward()
    assert compiled["graphs"] == counters["stats"]["unique_graphs"]


def task_module_and_batches(task: str):
    """A fine-tuning module of `task` on the tiny model and three batches of it."""
    from stoa_vlp.tasks.captioning import CaptioningModule
    from stoa_vlp.tasks.data import LabelledBatch
    from stoa_vlp.tasks.qa import QAModel

    config = tiny_config(*(f"loss.{name}=0" for name in ("mlm", "plm", "dota", "stasp")))
    model = tiny_model(config)
    batches = [make_batch(config, seed=seed) for seed in range(3)]
    if task == "retrieval":
        return Pretrainer(model, config.loss), batches
    if task == "captioning":
        return CaptioningModule(model), batches
    labelled = [LabelledBatch(**vars(batch), labels=torch.randint(0, 5, (len(batch),))) for batch in batches]
    return QAModel(model, num_answers=5), labelled


@pytest.mark.parametrize("task", ["retrieval", "captioning", "qa"])
def test_fine_tuning_steps_compile_into_whole_graphs(task):
    """train.compile for the downstream tasks: one graph set for every batch, no graph break, no host sync."""
    module, batches = task_module_and_batches(task)
    compiled = torch.compile(module, backend="eager", dynamic=False)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for seed, batch in enumerate(batches):
        torch.manual_seed(seed)
        got = compiled(batch)
        got["loss"].backward()
        torch.manual_seed(seed)
        torch.testing.assert_close(got["loss"], module(batch)["loss"])
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1]
    assert not counters["graph_break"], list(counters["graph_break"])
