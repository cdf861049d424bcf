"""Retrieval metrics against hand-computed similarity matrices (ties, several captions per video)."""

import numpy as np
import pytest
import torch

from stoa_vlp.metrics import retrieval
from stoa_vlp.metrics.retrieval import (
    best_caption_per_video,
    dual_softmax,
    nan_lowest,
    positive_mask,
    querybank_normalise,
    rank_metrics,
    ranks,
    rerank_top_k,
    retrieval_metrics,
    top_k_columns,
)


def test_one_caption_per_video_hand_computed():
    # 3 captions x 3 videos, caption i belongs to video i (1k-A protocol)
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # caption 0: video 0 first -> rank 1
            [0.8, 0.5, 0.7],  # caption 1: video 1 below 0.8 and 0.7 -> rank 3
            [0.3, 0.6, 0.4],  # caption 2: video 2 below 0.6 -> rank 2
        ]
    )
    t2v = torch.tensor([0, 1, 2])
    assert ranks(sim, positive_mask(t2v, 3)).tolist() == [1, 3, 2]
    # columns: video 0 scores (0.9, 0.8, 0.3) -> caption 0 first; video 1 (0.1, 0.5, 0.6) -> caption 1
    # below 0.6 -> rank 2; video 2 (0.2, 0.7, 0.4) -> caption 2 below 0.7 -> rank 2
    metrics = retrieval_metrics(sim, t2v)
    assert metrics["t2v_r1"] == pytest.approx(100 / 3)
    assert metrics["t2v_r5"] == 100.0
    assert metrics["t2v_mdr"] == 2.0
    assert metrics["t2v_mnr"] == pytest.approx(2.0)
    assert metrics["v2t_r1"] == pytest.approx(100 / 3)
    assert metrics["v2t_mdr"] == 2.0
    assert metrics["v2t_mnr"] == pytest.approx(5 / 3)


def test_ties_count_against_the_model():
    sim = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.7, 0.7], [0.0, 0.0, 0.0]])
    # caption 0 ties both negatives -> rank 3; caption 1 ties one -> 2; all-equal row -> worst rank 3
    assert ranks(sim, positive_mask(torch.tensor([0, 1, 2]), 3)).tolist() == [3, 2, 3]
    constant = torch.ones(4, 4)
    metrics = retrieval_metrics(constant, torch.arange(4))
    assert metrics["t2v_r1"] == 0.0 and metrics["v2t_mnr"] == 4.0


def test_nan_scores_rank_last(caplog):
    nan = float("nan")
    sim = torch.tensor([[nan, 0.1, 0.2], [0.8, 0.5, nan], [nan, nan, nan]])
    # caption 0: its video's NaN is below both negatives -> 3; caption 1: the NaN negative is below 0.5 -> 2;
    # caption 2: all NaN, a tie at the bottom -> worst rank 3
    assert ranks(sim, positive_mask(torch.tensor([0, 1, 2]), 3)).tolist() == [3, 2, 3]
    assert "5 of 9 similarity scores are NaN" in caplog.text
    assert retrieval_metrics(torch.full((4, 4), nan), torch.arange(4))["t2v_r1"] == 0.0


def test_several_captions_per_video_full_protocol():
    # 5 captions, 2 videos: captions 0,1,2 -> video 0; captions 3,4 -> video 1
    t2v = torch.tensor([0, 0, 0, 1, 1])
    sim = torch.tensor(
        [
            [0.9, 0.1],  # rank 1
            [0.2, 0.3],  # rank 2
            [0.4, 0.4],  # tie -> rank 2
            [0.1, 0.8],  # rank 1
            [0.6, 0.5],  # rank 2
        ]
    )
    assert ranks(sim, positive_mask(t2v, 2)).tolist() == [1, 2, 2, 1, 2]
    # v2t: video 0 scores captions (0.9, 0.2, 0.4, 0.1, 0.6): best own caption 0.9 -> rank 1, and its
    # other captions never count against it. Video 1 scores (0.1, 0.3, 0.4, 0.8, 0.5): best own 0.8,
    # no caption of video 0 reaches it -> rank 1. Lower video 1's caption 3 to 0.35: best own is
    # caption 4 (0.5); caption 2 (0.4) is below, so still rank 1; raise caption 2 to 0.5 -> tie -> 2.
    assert ranks(sim.t(), positive_mask(t2v, 2).t()).tolist() == [1, 1]
    sim[3, 1] = 0.35
    sim[2, 1] = 0.5
    assert ranks(sim.t(), positive_mask(t2v, 2).t()).tolist() == [1, 2]
    metrics = retrieval_metrics(sim, t2v)
    assert metrics["v2t_r1"] == 50.0 and metrics["v2t_mdr"] == 1.5


def test_video_to_text_among_videos_by_their_best_caption():
    # videos 0, 1, 2 with captions (0, 1, 2), (3, 4), (5); columns: each video's scores for the captions
    t2v = torch.tensor([0, 0, 0, 1, 1, 2])
    sim = torch.tensor(
        [
            [0.5, 0.1, 0.3],
            [0.2, 0.1, 0.35],
            [0.1, 0.1, 0.2],
            [0.6, 0.9, 0.3],
            [0.7, 0.3, 0.1],
            [0.55, 0.2, 0.3],
        ]
    )
    # video 0 (own best 0.5): among captions 3, 4 and 5 beat it -> 4; among videos 1 (0.7) and 2 (0.55) -> 3.
    # video 2 (own 0.3): captions 0 (tie), 1, 3 (tie) -> 4; videos 0 (best 0.35) and 1 (best 0.3, tie) -> 3.
    metrics = retrieval_metrics(sim, t2v, dual_softmax_scale=100.0)
    assert ranks(sim.t(), positive_mask(t2v, 3).t()).tolist() == [4, 1, 4]
    assert metrics["v2t_mnr"] == 3.0 and metrics["v2t_mdr"] == 4.0
    assert metrics["v2t_grouped_mnr"] == pytest.approx(7 / 3) and metrics["v2t_grouped_mdr"] == 3.0
    assert metrics["v2t_grouped_r1"] == metrics["v2t_r1"] == pytest.approx(100 / 3)
    assert "v2t_dsl_grouped_r1" in metrics and not any("t2v_grouped" in key for key in metrics)
    assert not any("grouped" in key for key in retrieval_metrics(sim[[0, 3, 5]], torch.tensor([0, 1, 2])))


def test_best_caption_per_video_matches_a_loop():
    generator = torch.Generator().manual_seed(3)
    t2v = torch.tensor([2, 0, 1, 1, 0, 2, 2, 3])
    sim = torch.rand(8, 4, generator=generator, dtype=torch.float64)
    grouped = best_caption_per_video(sim.t(), t2v, 4)
    for video in range(4):
        for group in range(4):
            expected = max(float(sim[c, video]) for c in range(8) if t2v[c] == group)
            assert grouped[video, group] == expected


def test_matches_brute_force_on_random_matrix():
    generator = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 6, (40, 12), generator=generator).float()  # many ties
    t2v = torch.cat([torch.arange(12), torch.randint(0, 12, (28,), generator=generator)])
    got_t2v = ranks(sim, positive_mask(t2v, 12)).tolist()
    got_v2t = ranks(sim.t(), positive_mask(t2v, 12).t()).tolist()
    for q in range(40):
        true = sim[q, t2v[q]].item()
        assert got_t2v[q] == 1 + sum(sim[q, c].item() >= true for c in range(12) if c != t2v[q])
    for v in range(12):
        own = [q for q in range(40) if t2v[q] == v]
        best = max(sim[q, v].item() for q in own)
        assert got_v2t[v] == 1 + sum(sim[q, v].item() >= best for q in range(40) if q not in own)


def test_rank_metrics_recalls_and_median():
    metrics = rank_metrics(torch.tensor([1, 2, 5, 6, 10, 11]))
    assert metrics == {"r1": pytest.approx(100 / 6), "r5": 50.0, "r10": pytest.approx(500 / 6),
                       "mdr": 5.5, "mnr": pytest.approx(35 / 6)}


def test_dual_softmax_is_reported_next_to_plain_numbers():
    # video 0 is a "hub": caption 1 prefers it; per video, dual softmax favours the closest caption
    values = np.array([[0.9, 0.5], [0.8, 0.7]])
    sim = torch.tensor(values, dtype=torch.float32)
    metrics = retrieval_metrics(sim, torch.tensor([0, 1]), dual_softmax_scale=100.0)
    prior = np.exp(100 * values)
    expected = values * prior / prior.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(dual_softmax(sim, 100.0).numpy(), expected, rtol=1e-4)
    assert metrics["t2v_r1"] == 50.0  # plain: caption 1 ranks video 1 second
    assert metrics["t2v_dsl_r1"] == 100.0  # re-ranked: video 0's prior goes to caption 0
    assert len(metrics) == 20 and {k.rsplit("_", 1)[0] for k in metrics} == {"t2v", "v2t", "t2v_dsl", "v2t_dsl"}


def test_querybank_normalisation_demotes_a_hub_as_the_exp_ratio_does():
    # video 0 is a hub: every bank query retrieves it first; test caption 1 (of video 1) does too
    bank = np.array([[0.9, 0.2, 0.1], [0.8, 0.3, 0.2], [0.7, 0.1, 0.3]])
    test = np.array([[0.5, 0.1, 0.6],    # top-1 video 2: no bank query retrieves it first -> unchanged
                     [0.62, 0.6, 0.1]])  # top-1 video 0 (activated) -> normalised
    scores = querybank_normalise(torch.tensor(test), torch.tensor(bank), beta=20.0)
    np.testing.assert_array_equal(scores[0].numpy(), test[0])
    ratio = np.exp(20 * test[1]) / np.exp(20 * bank).sum(axis=0)  # QB-Norm's dynamic inverted softmax
    np.testing.assert_allclose(scores[1].numpy(), np.log(ratio), rtol=1e-12)
    assert scores[1].argmax() == 1  # the hub no longer wins: caption 1 finds its own video
    positives = positive_mask(torch.tensor([2, 1]), 3)
    assert ranks(torch.tensor(test), positives).tolist() == [1, 2]
    assert ranks(scores, positives).tolist() == [1, 1]


def test_querybank_normalisation_reads_the_bank_in_chunks_with_the_same_scores():
    generator = torch.Generator().manual_seed(4)
    test, bank = torch.rand(7, 5, generator=generator), torch.rand(23, 5, generator=generator)
    whole = querybank_normalise(test, bank, beta=20.0, chunk_rows=len(bank))
    for chunk_rows in (1, 4, 22):
        torch.testing.assert_close(querybank_normalise(test, bank, beta=20.0, chunk_rows=chunk_rows), whole,
                                   rtol=1e-12, atol=1e-12)
    assert not torch.equal(whole, test.double())  # some query was normalised
    with pytest.raises(ValueError, match="chunk_rows must be at least 1, got 0"):
        querybank_normalise(test, bank, chunk_rows=0)


def test_rerank_touches_only_top_k():
    generator = torch.Generator().manual_seed(1)
    sim = torch.rand(6, 10, generator=generator)
    calls = []

    def reverse_scores(queries, candidates):
        calls.append((queries.clone(), candidates.clone()))
        return -sim[queries, candidates]  # reverse the order of the top-k

    reranked = rerank_top_k(sim, 3, reverse_scores)
    top = sim.topk(3, dim=1).indices
    queried = torch.zeros_like(sim, dtype=torch.bool)
    queried[calls[0][0], calls[0][1]] = True
    expected_top = torch.zeros_like(queried)
    expected_top.scatter_(1, top, True)
    assert torch.equal(queried, expected_top)  # only top-k pairs were scored
    assert torch.equal(reranked[~expected_top], sim.double()[~expected_top])  # the rest keep their values
    for row in range(6):
        new_order = reranked[row].argsort(descending=True)[:3].tolist()
        assert new_order == top[row].flip(0).tolist()  # reversed within the top-k
        assert reranked[row, top[row]].min() > sim[row][~expected_top[row]].max()


def test_rerank_with_contrastive_prior_matches_reference_fusion():
    sim = torch.tensor([[0.30, 0.20, 0.10, 0.00]])
    match = torch.tensor([[0.2, 0.9, 0.5, 1.0]])
    reranked = rerank_top_k(sim, 3, lambda q, c: match[q, c].log(), prior_scale=10.0)
    fused = torch.softmax(10.0 * sim[0, :3], dim=0) * match[0, :3]
    assert reranked[0, :3].argsort(descending=True).tolist() == fused.argsort(descending=True).tolist()
    assert reranked[0, 3] == 0.0 and reranked[0, :3].min() > 0.0


def test_rerank_keeps_apart_fused_scores_that_float32_rounds_together():
    # with the logit scale at 100, softmax_k * P is 1e-3, 4e-18, 2e-25 and 9e-30 here; placed above the
    # untouched entries in float32 (about 1 + score), the last three were one tie, which counted against
    # the model: the true video (column 1, P = 1) ranked 4th instead of 2nd
    sim = torch.tensor([[0.9, 0.5, 0.4, 0.3]])
    log_match = torch.tensor([[1e-3, 1.0, 1e-3, 1e-3]]).double().log()
    reranked = rerank_top_k(sim, 4, lambda q, c: log_match[q, c], prior_scale=100.0)
    assert reranked.dtype == torch.float64
    assert reranked[0].argsort(descending=True).tolist() == [0, 1, 2, 3]
    assert ranks(reranked, positive_mask(torch.tensor([1]), 4)).tolist() == [2]


def test_rerank_keeps_equal_new_scores_equal_and_puts_nan_last():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    new = torch.tensor([[-1.0, -1.0, float("nan"), 0.0], [-2.0, 5.0, 5.0, -3.0]], dtype=torch.float64)
    reranked = rerank_top_k(sim, 3, lambda q, c: new[q, c])
    assert reranked[0, 0] == reranked[0, 1] and reranked[0, 2] < reranked[0, 1]  # tie kept; NaN last of the top-k
    assert reranked[0, 2] > reranked[0, 3] == sim[0, 3].double()
    assert reranked[1, 1] == reranked[1, 2] > reranked[1, 3] and reranked[1, 0] == sim[1, 0].double()


def test_a_nan_similarity_ranks_last_when_reranking_too():
    # topk takes NaN for the largest value: it took a top-k slot and, through the softmax prior, made
    # every re-ranked score of its row NaN
    nan = float("nan")
    sim = torch.tensor([[0.9, 0.5, nan, 0.1, 0.2], [0.1, 0.8, nan, 0.3, 0.2]])
    reranked = rerank_top_k(sim, 2, lambda q, c: torch.zeros(len(q), dtype=torch.float64), prior_scale=1.0)
    assert ranks(reranked, positive_mask(torch.tensor([0, 1]), 5)).tolist() == [1, 1]
    assert reranked[0, 2] == float("-inf")


def test_dual_softmax_does_not_underflow_into_ties():
    # caption 0's columns hold scores 1.15 and 1.18 above its own: exp(-115) and exp(-118) are 0 in
    # float32, which tied its two videos at 0 and ranked its video 2nd
    sim = torch.tensor([[0.05, 0.02], [1.2, 0.0], [0.0, 1.2]])
    metrics = retrieval_metrics(sim, torch.tensor([0, 0, 1]), dual_softmax_scale=100.0, directions=("t2v",))
    scores = dual_softmax(sim, 100.0)
    assert scores.dtype == torch.float64 and scores[0, 0] > scores[0, 1] > 0
    assert metrics["t2v_dsl_r1"] == 100.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="outside"):
        positive_mask(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="videos without any caption"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_one_direction_gives_the_same_numbers_as_both():
    generator = torch.Generator().manual_seed(1)
    sim = torch.rand(9, 4, generator=generator)
    t2v = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    both = retrieval_metrics(sim, t2v, dual_softmax_scale=100.0)
    for direction in ("t2v", "v2t"):
        one = retrieval_metrics(sim, t2v, dual_softmax_scale=100.0, directions=(direction,))
        assert one == {key: value for key, value in both.items() if key.startswith(direction)}
        # r1, r5, r10, mdr, mnr, plain and dual softmax; for v2t also ranked among videos (several captions)
        assert len(one) == {"t2v": 10, "v2t": 20}[direction]


def reference_ranks(similarity, positives):
    """The unblocked computation: the whole (Q, C) matrix in float64 at once."""
    similarity = nan_lowest(similarity.double())
    best_positive = similarity.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values
    return 1 + ((similarity >= best_positive) & ~positives).sum(dim=1)


def reference_metrics(similarity, t2v, scale):
    similarity, num_videos = similarity.double(), similarity.shape[1]
    positives = positive_mask(t2v, num_videos)
    metrics = {}
    for name, scores, mask in (("t2v", similarity, positives), ("v2t", similarity.t(), positives.t())):
        for prefix, values in ((name, scores), (f"{name}_dsl", scores * torch.softmax(scores * scale, dim=0))):
            metrics.update({f"{prefix}_{k}": v for k, v in rank_metrics(reference_ranks(values, mask)).items()})
            if name == "v2t":
                grouped = torch.stack([nan_lowest(values[:, t2v == video]).amax(dim=1) for video in range(num_videos)], 1)
                grouped_ranks = reference_ranks(grouped, torch.eye(num_videos, dtype=torch.bool))
                metrics.update({f"{prefix}_grouped_{k}": v for k, v in rank_metrics(grouped_ranks).items()})
    return metrics


@pytest.mark.parametrize("block_pairs", [1, 7, 40, 1 << 22])
def test_blocked_ranks_match_the_full_matrix_computation(monkeypatch, block_pairs):
    # blocks of 1 row (block_pairs <= C), a few rows, and the whole matrix; ties, NaN rows and columns,
    # several captions per video; the dual softmax agrees with torch.softmax's to float64 rounding
    monkeypatch.setattr(retrieval, "RANK_BLOCK_PAIRS", block_pairs)
    generator = torch.Generator().manual_seed(5)
    num_texts, num_videos = 37, 9
    t2v = torch.cat([torch.arange(num_videos), torch.randint(0, num_videos, (num_texts - num_videos,), generator=generator)])
    tied = torch.randint(0, 6, (num_texts, num_videos), generator=generator).float() / 5
    with_nan = torch.rand(num_texts, num_videos, generator=generator)
    with_nan[torch.rand(num_texts, num_videos, generator=generator) < 0.1] = float("nan")
    with_nan[3] = float("nan")
    for sim in (tied, with_nan, torch.rand(num_texts, num_videos, generator=generator).double(), torch.ones(num_texts, num_videos)):
        assert retrieval_metrics(sim, t2v, dual_softmax_scale=100.0) == reference_metrics(sim, t2v, 100.0)
        positives = positive_mask(t2v, num_videos)
        assert torch.equal(ranks(sim, positives), reference_ranks(sim, positives))
        assert torch.equal(ranks(sim.t(), positives.t()), reference_ranks(sim.t(), positives.t()))
        for oriented in (sim, sim.t()):
            blocked = retrieval._BlockedScores.dual_softmax(oriented, 100.0).block()
            torch.testing.assert_close(blocked, dual_softmax(oriented, 100.0), rtol=1e-12, atol=0, equal_nan=True)
    assert torch.equal(best_caption_per_video(tied.t(), t2v, num_videos),
                       torch.stack([tied[t2v == video].amax(dim=0) for video in range(num_videos)], 0).t())


def test_rerank_re_scores_the_lowest_columns_of_those_tied_at_the_k_th_score():
    # before: torch.topk's cut, which took columns 0 and 2 of the first row and 0, 5, 6 of an 8-column one
    similarity = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.5],
                               [0.5, 0.5, 0.5, 0.5, 0.5],
                               [0.1, 0.2, 0.2, 0.8, 0.2],
                               [0.3, float("nan"), 0.1, 0.3, 0.2]])  # NaN is the lowest score
    asked = []

    def pair_scores(queries, candidates):
        asked.append(torch.stack([queries, candidates], dim=1).tolist())
        return torch.zeros(len(queries))

    rerank_top_k(similarity, 2, pair_scores)
    assert asked == [[[0, 0], [0, 1], [1, 0], [1, 1], [2, 1], [2, 3], [3, 0], [3, 3]]]
    wide = torch.zeros(1, 8, dtype=torch.float64)
    wide[0, 0] = 1.0
    assert top_k_columns(wide, 3).tolist() == [[0, 1, 2]]


def test_top_k_columns_are_those_of_a_stable_descending_sort():
    generator = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 4, (50, 40), generator=generator).double()  # many ties at every cut
    scores[:10] = torch.rand(10, 40, generator=generator, dtype=torch.float64)  # rows without ties
    for k in (1, 7, 40):
        stable = scores.sort(dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        assert torch.equal(top_k_columns(scores, k), stable)
