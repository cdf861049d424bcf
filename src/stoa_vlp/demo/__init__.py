"""`stoa-vlp demo`, the main job: the whole system on the synthetic world, on a CPU, in minutes.

The demo is a list of stages, `DEMO_STAGES` (run.py), run in order over one `DemoRun`:
  world      render the synthetic moving-objects world (videos, captions, detections)   (pretraining.py)
  tags       noun/verb tags of every caption (spaCy), for DOTA and STASP                 (pretraining.py)
  pretrain   pre-train the tiny model with the six objectives (the Trainer, checkpoints, metrics)
             (pretraining.py)
  retrieval  zero-shot text-to-video and video-to-text retrieval on the test clips, against chance
             (zero_shot.py)
  alignment  how often DOTA's matching pairs a test clip's trajectory with a noun naming its class,
             against chance; visual.png draws the first test clip (stoa-vlp visualise)   (zero_shot.py)
  captioning, qa  short downstream fine-tuning from the pre-trained model, scored on the test clips
             (downstream.py)
Each stage records its metrics in `run.metrics[name]`, adds a Markdown section to `run.report`
and may print a table. The downstream stages come from `stoa_vlp.demo.downstream.DOWNSTREAM_STAGES`,
listed in `DEMO_STAGES` after the alignment stage; a stage is a `(name, function)` pair whose function
reads the trained model as `run.model`, the config as `run.config` and the world as `run.world`.
The config (the pre-training's and each downstream stage's) is checked before anything is written,
so a demo that cannot start leaves no folder behind; demo_metrics.json is written first and after
every stage, so a folder that a failed demo left is recognised as one (--overwrite replaces it).
At the end the folder holds report.md, demo_metrics.json, the world, the tag cache, the run's
checkpoints, metrics.jsonl and TensorBoard events.
"""

from stoa_vlp.demo.run import DEMO_STAGES, DemoRun, DemoSettings, run_demo
from stoa_vlp.demo.zero_shot import chance_metrics, class_noun_agreement, retrieval_stage

__all__ = ["DEMO_STAGES", "DemoRun", "DemoSettings", "chance_metrics", "class_noun_agreement", "retrieval_stage",
           "run_demo"]
