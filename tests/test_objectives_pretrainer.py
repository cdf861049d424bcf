"""Pretrainer: the loss dict, weights, skipped objectives, towers once, one host transfer, overfitting."""

import contextlib
from unittest import mock

import pytest
import torch

from _objectives_batch import make_batch, tiny_config, tiny_model
from stoa_vlp.objectives import OBJECTIVES, Pretrainer
from stoa_vlp.objectives import pretrainer as pretrainer_module

ONLY = {name: [f"loss.{other}=0" for other in OBJECTIVES if other != name] for name in OBJECTIVES}


def test_returns_the_weighted_total_and_one_detached_value_per_objective():
    config = tiny_config("loss.vtc=0.5", "loss.plm=2")
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    torch.manual_seed(0)
    losses = pretrainer(make_batch(config))
    assert set(losses) == {"loss", *OBJECTIVES}
    assert all(not losses[name].requires_grad and losses[name].ndim == 0 for name in OBJECTIVES)
    weights = {"vtc": 0.5, "vtm": 1, "mlm": 1, "plm": 2, "dota": 1, "stasp": 1}
    expected = sum(weights[name] * losses[name] for name in OBJECTIVES)
    torch.testing.assert_close(losses["loss"].detach(), expected)
    assert losses["loss"].requires_grad and torch.isfinite(losses["loss"])


def test_a_zero_weight_skips_the_computation():
    config = tiny_config("loss.vtm=0", "loss.mlm=0", "loss.dota=0")
    model = tiny_model(config)
    pretrainer = Pretrainer(model, config.loss)
    failing = mock.Mock(side_effect=AssertionError("disabled objective computed"))
    with contextlib.ExitStack() as patches:
        for name in ("vtm_rows", "mlm_rows", "choose_mlm_positions", "sample_hard_negatives"):
            patches.enter_context(mock.patch(f"stoa_vlp.objectives.pretrainer.{name}", failing))
        encode_text = patches.enter_context(mock.patch.object(model, "encode_text", wraps=model.encode_text))
        losses = pretrainer(make_batch(config))
    assert set(losses) == {"loss", "vtc", "plm", "stasp"}
    ((tokens, _), _) = encode_text.call_args
    assert encode_text.call_count == 1 and tokens.shape[0] == 4  # no masked copy without MLM


def test_towers_run_once_with_the_masked_copy_stacked():
    config = tiny_config()
    model = tiny_model(config)
    batch = make_batch(config)
    with mock.patch.object(model, "encode_text", wraps=model.encode_text) as encode_text, mock.patch.object(
        model, "encode_video", wraps=model.encode_video
    ) as encode_video:
        Pretrainer(model, config.loss)(batch)
    assert encode_video.call_count == 1 and encode_text.call_count == 1
    ((tokens, text_mask), _) = encode_text.call_args
    assert tokens.shape[0] == 8 and torch.equal(tokens[:4], batch.tokens)
    changed = tokens[4:] != batch.tokens
    assert changed.any() and (tokens[4:][changed] == 0).all()  # masked ids only


def test_all_cost_matrices_go_to_the_host_once_per_step():
    config = tiny_config()
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    host_calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        host_calls.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "cpu", counting_cpu):
        pretrainer(make_batch(config))
    # one (2B, max(N, M), L + 1) tensor: DOTA and STASP of all 4 samples
    assert host_calls == [(8, config.model.trajectories, config.model.text_len + 1)]


def test_seeded_steps_repeat_exactly():
    config = tiny_config()
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    batch = make_batch(config)
    torch.manual_seed(7)
    first = pretrainer(batch)
    torch.manual_seed(7)
    second = pretrainer(batch)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("stop", [False, True])
def test_fusion_stop_gradient_keeps_fusion_objectives_out_of_both_towers(stop):
    # without objects: trajectories, which stay attached, would carry the fusion's gradient into the
    # video tower (the action encoder reads a detached tap)
    config = tiny_config(*ONLY["mlm"], "model.objects=false", f"loss.fusion_stop_gradient={str(stop).lower()}")
    model = tiny_model(config)
    Pretrainer(model, config.loss)(make_batch(config))["loss"].backward()
    text_gradient = sum(  # the token embedding is also the tied LM head, which MLM always trains
        p.grad.abs().sum() for name, p in model.text.named_parameters() if p.grad is not None and "token_embedding" not in name
    )
    video_gradient = sum(p.grad.abs().sum() for p in model.visual.parameters() if p.grad is not None)
    assert (text_gradient > 0) == (video_gradient > 0) == (not stop)
    assert model.fusion.position_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.vtc=0", "loss.vtm=0", "loss.mlm=0", "loss.plm=0", "loss.dota=0", "loss.stasp=0"], "every loss weight is 0"),
        (["loss.vtm=-1"], "loss.vtm must be >= 0"),
        (["loss.vtc_video_feature=cls"], "loss.vtc_video_feature must be one of"),
        (["loss.match_similarity=l2"], "loss.match_similarity must be one of"),
        (["loss.mlm_probability=0"], "loss.mlm_probability must be in (0, 1]"),
        (["model.objects=false"], "loss.dota > 0 needs trajectories"),
        (["model.actions=false"], "loss.stasp > 0 needs action features"),
    ],
)
def test_inconsistent_loss_configs_are_rejected(overrides, message):
    config = tiny_config(*overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        Pretrainer(tiny_model(config), config.loss)


RANDOM_DRAWS = ("choose_mlm_positions", "sample_hard_negatives", "sample_suffix_starts")


def recording_draws(draws: dict) -> contextlib.ExitStack:
    """Patches the pretrainer's random draws (MLM positions, VTM negatives, PLM starts) to record
    what each returns into `draws` (name -> list, in call order)."""
    def recorder(real, seen: list):
        def record(*args):
            seen.append(real(*args))
            return seen[-1]

        return record

    stack = contextlib.ExitStack()
    for name in RANDOM_DRAWS:
        record = recorder(getattr(pretrainer_module, name), draws.setdefault(name, []))
        stack.enter_context(mock.patch.object(pretrainer_module, name, side_effect=record))
    return stack


def replaying_draws(draws: dict) -> contextlib.ExitStack:
    """Patches the pretrainer's random draws to return the recorded `draws` in order."""
    stack = contextlib.ExitStack()
    for name in RANDOM_DRAWS:
        stack.enter_context(mock.patch.object(pretrainer_module, name, side_effect=list(draws[name])))
    return stack


def test_without_objects_and_actions_each_loss_is_that_objective_computed_alone():
    ablation = ("model.objects=false", "model.actions=false", "loss.dota=0", "loss.stasp=0")
    config = tiny_config(*ablation)
    model = tiny_model(config)
    batch = make_batch(config)
    draws = {}
    with recording_draws(draws):
        losses = Pretrainer(model, config.loss)(batch)
    assert set(losses) == {"loss", "vtc", "vtm", "mlm", "plm"}
    for name in ("vtc", "vtm", "mlm", "plm"):  # the same draws, the other objectives' fusion rows left out
        alone = tiny_config(*ablation, *ONLY[name])
        with replaying_draws(draws):
            torch.testing.assert_close(Pretrainer(model, alone.loss)(batch)[name], losses[name], msg=name)
    # VTC reads the towers only: the full model given the same tower weights gets the same value
    full = tiny_config(*ONLY["vtc"])
    full_model = tiny_model(full)
    loaded = full_model.load_state_dict(model.state_dict(), strict=False)
    assert {key.split(".")[0] for key in loaded.missing_keys} == {"object_tokens", "trajectory_encoder", "action_encoder"}
    torch.testing.assert_close(Pretrainer(full_model, full.loss)(batch)["vtc"], losses["vtc"])


def test_bf16_autocast_losses_are_the_fp32_losses_to_bf16_precision():
    config = tiny_config()
    pretrainer = Pretrainer(tiny_model(config), config.loss)
    batch = make_batch(config)
    torch.manual_seed(0)
    full = pretrainer(batch)
    torch.manual_seed(0)  # the same masks, negatives and suffixes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = pretrainer(batch)
    # bf16 keeps 8 significant bits: one rounding is off by up to 2**-9 (0.2 %), and the errors of the
    # some ten rounded matrix products behind each feature add up. Measured, the losses came within
    # 0.5 % of float32 (VTC the furthest: scaled cosines through a softmax); 2 % leaves 4x that
    for name in full:
        torch.testing.assert_close(losses[name].float(), full[name].detach(), rtol=0.02, atol=0, msg=name)
    losses["loss"].backward()


def test_the_tiny_model_overfits_one_batch_on_every_objective():
    # captions have at most 10 words; the LM losses (~11 at start) are down-weighted so that their
    # gradients do not drown the others' in the shared fusion encoder over so few steps
    config = tiny_config("model.text_len=12", "loss.mlm=0.2", "loss.plm=0.2")
    model = tiny_model(config)
    pretrainer = Pretrainer(model, config.loss)
    batch = make_batch(config)
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 1.0, 0.0), fused=True)

    def evaluate() -> dict[str, float]:
        """Mean over 3 fixed seeds (fixed masks, negatives and suffixes), without gradient."""
        totals = dict.fromkeys(OBJECTIVES, 0.0)
        with torch.no_grad():
            for seed in range(3):
                torch.manual_seed(100 + seed)
                losses = pretrainer(batch)
                for name in OBJECTIVES:
                    totals[name] += float(losses[name]) / 3
        return totals

    before = evaluate()
    torch.manual_seed(0)
    for _ in range(40):
        optimizer.zero_grad()
        pretrainer(batch)["loss"].backward()
        optimizer.step()
    after = evaluate()
    # VTM starts near its label-prior optimum (0.64 for 1 positive : 2 negatives); 0.9x needs real matching
    for name in OBJECTIVES:
        assert after[name] < 0.9 * before[name], (name, before[name], after[name])
