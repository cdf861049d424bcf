"""The text tower's causal attention goes to SDPA as is_causal=True (flash-eligible), equal to the explicit mask."""

from unittest import mock

import torch
import torch.nn.functional as F

from _objectives_batch import make_batch, tiny_config, tiny_model


def test_text_tower_uses_is_causal_and_matches_the_materialised_mask():
    config = tiny_config()
    model = tiny_model(config).eval()
    tokens = make_batch(config).tokens
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real_sdpa(*args, **kwargs)

    with torch.no_grad():
        with mock.patch.object(F, "scaled_dot_product_attention", recording_sdpa):
            features = model.text(tokens)
        # reference: the same blocks with a materialised lower-triangular boolean mask
        length = tokens.shape[1]
        x = model.text.token_embedding(tokens) + model.text.positional_embedding[:length]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        expected = model.text.ln_final(model.text.transformer(x, causal)) @ model.text.text_projection
    assert calls == [(None, True)] * config.model.text_layers
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)
