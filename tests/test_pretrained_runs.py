"""Pre-training runs used downstream: the object-class vocabulary travels with the weights (pre-training
saves it in its run folder; fine-tuning from that run, resuming it or evaluating a moved run use the
same class ids), the CLIP file the run started from is not needed again, and evaluation tells a
pre-training checkpoint from a fine-tuned one."""

import json
import shutil

import pytest
import torch

from stoa_vlp.cli import main
from stoa_vlp.config import load_config
from stoa_vlp.data.dataset import build_dataset
from stoa_vlp.data.detections import LabelVocab, read_detections
from stoa_vlp.data.side_data import load_detections
from stoa_vlp.data.synth import render_world
from stoa_vlp.model import STOAVLP
from stoa_vlp.tasks.runs import checkpoint_config
from stoa_vlp.train.checkpointing import list_checkpoints


def write_clip_file(path, model_settings: list[str]) -> None:
    """A CLIP state dict (CLIP's key names) of the towers of a random tiny model."""
    model = STOAVLP(load_config("tiny", model_settings).model)
    towers = {name.removeprefix("text."): value for name, value in model.state_dict().items()
              if model.is_tower_parameter(name)}
    torch.save(towers, path)


def test_class_ids_follow_the_pretrained_weights(tmp_path, capsys):
    world = render_world(tmp_path / "world", train=4, val=0, test=2, seconds=1.0, fps=6.0, seed=2)
    clip = tmp_path / "clip.pt"
    write_clip_file(clip, ["model.frames=2", "model.image_size=32"])
    common = ["--config", "tiny", "--set", f"data.train={world.annotations}", "--set", f"data.video_root={world.videos}",
              "--set", "data.batch_size=4", "--set", "model.frames=2", "--set", "model.image_size=32",
              "--set", f"model.init_checkpoint={clip}",
              "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.warmup_steps=1"]
    pretrained = tmp_path / "pretrained"
    assert main(["pretrain", *common, "--output", str(pretrained), "--set", f"data.detections={world.detections}",
                 "--set", "train.steps=1"]) == 0
    clip.unlink()  # fine-tuning from the run, resuming it and evaluating it read its trained weights only
    saved = pretrained / "label_vocab.json"
    names = LabelVocab.load(saved).names
    assert names == LabelVocab.from_detections(read_detections(world.detections), max_size=16).names
    state = json.loads((list_checkpoints(pretrained)[-1] / "state.json").read_text())
    assert state["config"]["data"]["label_vocab"] == str(saved.resolve())

    # another detections file, in which the classes are counted in another order
    lines = world.detections.read_text().splitlines()
    other = tmp_path / "other_detections.jsonl"
    other.write_text("\n".join(lines[-1:]) + "\n")
    assert LabelVocab.from_detections(read_detections(other), max_size=16).names != names  # else this checks nothing
    finetuned = tmp_path / "finetuned"
    assert main(["finetune", "--task", "retrieval", *common, "--output", str(finetuned), "--init", str(pretrained),
                 "--set", f"data.detections={other}", "--set", "train.steps=1", "--set", "task.rerank_k=0"]) == 0
    assert LabelVocab.load(finetuned / "label_vocab.json").names == names

    # a resumed pre-training run keeps its ids although its detections changed
    assert main(["pretrain", *common, "--output", str(pretrained), "--set", f"data.detections={other}",
                 "--set", "train.steps=2", "--resume", "latest"]) == 0
    assert LabelVocab.load(saved).names == names

    # evaluated zero-shot as pre-training, and captions with its prefix-LM head; QA would need an answer
    # head it does not have
    capsys.readouterr()
    assert main(["evaluate", str(pretrained), "--split", "test", "--set", f"data.test={world.annotations}",
                 "--set", "task.rerank_k=0"]) == 0
    assert "(trained for pre-training); task: retrieval; split: test" in capsys.readouterr().out
    video = world.videos / f"{world.video_ids['test'][0]}.mp4"
    assert main(["caption", "--checkpoint", str(pretrained), str(video), "--max-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{video}\t")
    with pytest.raises(ValueError, match="was trained for pre-training, not QA: its answer head would be untrained"):
        main(["evaluate", str(pretrained), "--task", "qa", "--split", "test"])
    assert not (pretrained / "answers.json").exists()

    # a moved run finds its vocabulary in its own folder
    moved = tmp_path / "moved"
    shutil.move(pretrained, moved)
    _, config = checkpoint_config(list_checkpoints(moved)[-1], [])
    assert config.data.label_vocab == str((moved / "label_vocab.json").resolve())


def test_training_and_tasks_build_one_vocabulary_within_the_model_size(tmp_path, caplog):
    world = render_world(tmp_path / "world", train=4, val=0, test=0, seconds=1.0, fps=6.0, seed=2)
    config = load_config("tiny", [f"data.train={world.annotations}", f"data.video_root={world.videos}",
                                  f"data.detections={world.detections}", "model.num_object_classes=4"])
    all_classes = LabelVocab.from_detections(read_detections(world.detections))
    assert len(all_classes) > 4  # else the cap checks nothing
    _, vocab = load_detections(config)
    assert vocab.names == all_classes.names[:4] == build_dataset(config, "train").label_vocab.names
    all_classes.save(tmp_path / "big.json")
    config.data.label_vocab = str(tmp_path / "big.json")
    with pytest.raises(ValueError, match="big.json: .* classes .* do not fit model.num_object_classes=4"):
        load_detections(config)
    config.data.label_vocab = str(tmp_path / "gone.json")
    assert load_detections(config)[1].names == vocab.names
    assert "gone.json does not exist: object class ids are rebuilt" in caplog.text
