"""worker.infer.channel_argmax: the labels torch's argmax over the channel axis gives, ties included."""

from __future__ import annotations

import torch

from worker.infer import channel_argmax


def test_equals_torch_argmax_on_scores_of_a_network_grid() -> None:
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(6, 37, 41, 29, generator=generator)
    got = channel_argmax(scores)
    assert got.dtype == torch.uint8 and got.shape == scores.shape[1:]
    assert torch.equal(got, scores.argmax(dim=0).to(torch.uint8))


def test_ties_go_to_the_first_channel_as_with_argmax() -> None:
    scores = torch.zeros(5, 3, 3, 3)
    scores[2], scores[4] = 1.0, 1.0  # channels 2 and 4 tie everywhere
    scores[:, 0, 0, 0] = 0.0  # all five tie here: channel 0
    assert torch.equal(channel_argmax(scores), scores.argmax(dim=0).to(torch.uint8))
    assert int(channel_argmax(scores)[1, 1, 1]) == 2 and int(channel_argmax(scores)[0, 0, 0]) == 0


def test_one_channel_is_all_background() -> None:
    assert int(channel_argmax(torch.randn(1, 4, 4, 4)).sum()) == 0
