"""The checks of a run's settings made before it writes anything: the model, train, data and loss
settings (`check_settings`) and the metric that picks the best checkpoint (`best_metric_problems`)."""

from __future__ import annotations

from stoa_vlp.config import Config


def check_settings(config: Config, pretraining: bool = False) -> None:
    """The checks of the model, train and (for the tasks trained with the pre-training objectives) loss
    settings, made before the run folder is written: a run that cannot start leaves no files behind
    that --overwrite would then refuse to delete. `pretraining`: for `stoa-vlp pretrain`, whose
    validation is zero-shot retrieval."""
    from stoa_vlp.data.annotations import FORMATS
    from stoa_vlp.data.dataset import is_webdataset
    from stoa_vlp.data.decode import SAMPLING
    from stoa_vlp.model.stoa import check_config
    from stoa_vlp.objectives.pretrainer import OBJECTIVES, check_loss_config
    from stoa_vlp.train.loop import check_train_settings
    from stoa_vlp.train.run_length import warn_if_warmup_outlasts_run

    check_config(config.model)
    check_train_settings(config.train)
    for name in ("train_sampling", "eval_sampling"):
        if getattr(config.data, name) not in SAMPLING:
            raise ValueError(f"data.{name} must be one of {', '.join(SAMPLING)}, got {getattr(config.data, name)!r}")
    if config.data.format not in ("auto", *FORMATS):
        raise ValueError(f"data.format must be auto or one of {', '.join(FORMATS)}, got {config.data.format!r}")
    if config.train.epochs > 0 and config.data.train and is_webdataset(config, config.data.train):
        raise ValueError("train.epochs needs a training set of known length; WebDataset shards are streamed: "
                         "give the run's length as train.steps")
    # retrieval and mc (and pre-training, task.name's default) train with the pre-training objectives
    # (task_config turns those off that retrieval and mc do not use); captioning and QA with none of them
    trains_with = OBJECTIVES if config.task.name in ("retrieval", "mc") else ()
    check_loss_config(config.loss, config.model, trains_with)
    problems = []
    if not config.data.max_bad_samples <= 1:
        problems.append(f"data.max_bad_samples is a share of the samples: at most 1 (1 tolerates any), got "
                        f"{config.data.max_bad_samples}")
    problems += best_metric_problems(config, pretraining)
    if problems:
        raise ValueError("; ".join(problems))
    if not (config.train.epochs > 0 or config.train.warmup_share > 0):  # else said once they are resolved
        warn_if_warmup_outlasts_run(config.train)


def best_metric_problems(config: Config, pretraining: bool = False) -> list[str]:
    """train.best_metric must name a validation metric (val/NAME) that the task's validation (zero-shot
    retrieval's when `pretraining`) gives and that is better when higher (`validation_metric_names`;
    for QA also an answer type's accuracy_<type>); without data.val it is not used."""
    from stoa_vlp.data.decode import natural_key
    from stoa_vlp.tasks.pipeline import validation_metric_names

    metric = config.train.best_metric
    if not config.data.val:
        return []
    if not metric.startswith("val/") or metric == "val/":
        return [f"train.best_metric must name a validation metric, val/NAME, got {metric!r}"]
    name, names = metric[len("val/"):], validation_metric_names(config, pretraining)
    answer_type = config.task.name == "qa" and not pretraining and name.startswith("accuracy_")
    if name in names or answer_type:
        return []
    listed = sorted((f"val/{name}" for name in names), key=natural_key)  # r1, r5, r10
    if config.task.name == "qa" and not pretraining:
        listed.append("val/accuracy_<answer type>")
    what = "zero-shot retrieval (pre-training)" if pretraining else config.task.name
    return [f"train.best_metric {metric} is not a metric of {what} validation that can pick the best checkpoint, "
            f"where the highest value wins (one of {', '.join(listed)})"]
