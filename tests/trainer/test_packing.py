"""Rows -> mini-batches -> micro-batches: coverage, whole groups, token budgets, layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.packing import Sequences, layout_tokens, make_micro_batch, pack, partition
from trainer.segment_attention import Block, Segments, block_attention


def _seqs(groups: int, g: int, seed: int = 0) -> Sequences:
    rng = np.random.default_rng(seed)
    prompts, responses, group_ids = [], [], []
    for k in range(groups):
        prompt = tuple(int(x) for x in rng.integers(1, 50, size=rng.integers(3, 9)))
        for _ in range(g):
            prompts.append(prompt)
            responses.append(tuple(int(x) for x in rng.integers(1, 50, size=rng.integers(0, 20))))
            group_ids.append(k)
    n = len(prompts)
    return Sequences(
        prompts=prompts,
        responses=responses,
        behaviour_logp=[tuple(-1.0 for _ in r) for r in responses],
        advantages=torch.zeros(n),
        versions=torch.zeros(n, dtype=torch.long),
        groups=torch.tensor(group_ids),
    )


@pytest.mark.parametrize("shared", [False, True], ids=["padded", "shared-prompt"])
def test_partition_covers_every_row_once_within_the_token_budget(shared: bool) -> None:
    seqs = _seqs(5, 4)
    plan = partition(seqs, 3, 30, torch.Generator().manual_seed(0), shared)
    rows = [r for mini in plan for micro in mini for r in micro]
    assert sorted(rows) == list(range(len(seqs)))
    assert len(plan) == 3
    for mini in plan:
        for micro in mini:
            assert len(micro) == 1 or layout_tokens(seqs, micro, shared) <= 30


def test_mini_batches_hold_whole_groups_when_they_divide_evenly() -> None:
    seqs = _seqs(8, 8)
    for seed in range(5):
        plan = partition(seqs, 4, 10_000, torch.Generator().manual_seed(seed), True)
        for mini in plan:
            rows = [r for micro in mini for r in micro]
            groups = {int(seqs.groups[r]) for r in rows}
            assert len(rows) == 16 and len(groups) == 2  # two whole groups of 8
    # and the group order is shuffled by the generator
    orders = {
        tuple(int(seqs.groups[m[0][0]]) for m in partition(seqs, 4, 10_000, torch.Generator().manual_seed(s), True))
        for s in range(5)
    }  # fmt: skip
    assert len(orders) > 1


def test_padded_packing_splits_off_a_long_row_instead_of_padding_to_it() -> None:
    seqs = _seqs(1, 9)
    seqs.responses[:] = [(1,)] * 8 + [tuple(range(1, 101))]
    micros = pack(seqs, range(9), max_tokens=10_000)
    assert micros[-1] == [8] and sorted(r for m in micros for r in m) == list(range(9))


def test_shared_prompt_micro_batch_is_one_unpadded_row_of_blocks() -> None:
    seqs = _seqs(2, 3)
    rows = [0, 3, 1, 4, 2]  # the two groups interleaved
    mb = make_micro_batch(seqs, rows, pad_id=0, shared_prompt=True)
    assert mb.attention_mask is None and mb.segments is not None
    (blocks,) = mb.segments.rows
    assert [b.prompt_len for b in blocks] == [len(seqs.prompts[0]), len(seqs.prompts[3])]
    assert mb.input_ids.shape == (1, layout_tokens(seqs, rows, True))
    ids, pos = mb.input_ids[0].tolist(), mb.position_ids[0].tolist()
    for i, r in enumerate(rows):
        prompt, resp = seqs.prompts[r], seqs.responses[r]
        got = [
            ids[s] for s, row in zip(mb.src.tolist(), mb.out_row.tolist(), strict=True) if row == i
        ]
        # each token is predicted by the position holding the token before it
        assert got == [*prompt, *resp][len(prompt) - 1 : len(prompt) - 1 + len(resp)]
        at = [
            p + 1
            for s, row in zip(mb.src.tolist(), mb.out_row.tolist(), strict=True)
            if row == i
            for p in [pos[s]]
        ]
        assert at == list(range(len(prompt), len(prompt) + len(resp)))  # fmt: skip


def test_block_attention_rejects_segments_that_do_not_fit() -> None:
    q = torch.randn(1, 2, 6, 4)
    bad_rows = Segments(rows=((Block(0, 2, ((2, 6),)),), (Block(0, 2, ()),)))
    with pytest.raises(ValueError, match="2 rows"):
        block_attention(q, q, q, bad_rows)
    gap = Segments(rows=((Block(1, 2, ((3, 6),)),),))
    with pytest.raises(ValueError, match="gap"):
        block_attention(q, q, q, gap)


def test_shard_gives_every_row_to_one_rank_by_whole_groups_balanced_by_tokens() -> None:
    from trainer.packing import mini_batch_rows, shard

    seqs = _seqs(6, 4)
    for mini in mini_batch_rows(seqs, 2, torch.Generator().manual_seed(0)):
        assert shard(seqs, mini, 0, 1) == mini  # one rank: the mini-batch itself
        shares = [shard(seqs, mini, rank, 2) for rank in range(2)]
        assert sorted(r for s in shares for r in s) == sorted(mini)
        groups = [{int(seqs.groups[r]) for r in s} for s in shares]
        assert all(groups) and not groups[0] & groups[1]  # whole groups, both ranks busy
    # Fewer groups than ranks: split by responses.
    one_group = [r for r in range(len(seqs)) if int(seqs.groups[r]) == 0]
    shares = [shard(seqs, one_group, rank, 3) for rank in range(3)]
    assert sorted(r for s in shares for r in s) == one_group and all(shares)
