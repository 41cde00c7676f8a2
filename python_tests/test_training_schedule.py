"""The trainers' pure helpers against hand computations: seeding, shifts, the lr schedule, AdamW groups,
argument checks, and the epoch plans (which images each step reads)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from devit_ext.training import common as U
from devit_ext.training import sampling as S
from devit_ext.training.stepper import steps_per_epoch

MASK63 = 0x7FFFFFFFFFFFFFFF


# -- seeding -------------------------------------------------------------------------------------------


def test_generator_seed_is_the_documented_hash_of_seed_and_salt():
    assert U.generator(7).initial_seed() == 7
    assert U.generator(5, 2).initial_seed() == 5 * 1_000_003 + 3
    assert U.generator(5, 2, 3).initial_seed() == (5 * 1_000_003 + 3) * 1_000_003 + 4
    assert U.generator(2**32 + 5, 2).initial_seed() == 5 * 1_000_003 + 3  # the seed is taken mod 2^32
    big = U.generator(2**32 - 1, 2**40, 2**40).initial_seed()
    s = 2**32 - 1
    for v in (2**40, 2**40):
        s = (s * 1_000_003 + v + 1) & MASK63
    assert big == s  # salts wrap at 63 bits
    assert U.generator(1, 0, 1).initial_seed() != U.generator(1, 1, 0).initial_seed()  # the order counts


def test_seed_everything_seeds_torch_numpy_and_random_from_the_generator_seed():
    s = (3 * 1_000_003 + 2) * 1_000_003 + 5
    U.seed_everything(3, 1, 4)
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], torch.rand(3, generator=torch.Generator().manual_seed(s)))
    assert np.array_equal(got[1], np.random.RandomState(s & 0xFFFFFFFF).rand(3))
    want = random.Random(s)
    assert got[2] == [want.random() for _ in range(3)]


# -- pixel shifts ----------------------------------------------------------------------------------------


def _offset_of(img, padded, s):
    H, W = img.shape[-2:]
    hits = [(dy, dx) for dy in range(2 * s + 1) for dx in range(2 * s + 1)
            if torch.equal(padded[:, dy:dy + H, dx:dx + W], img)]
    assert len(hits) == 1, hits
    return hits[0]


def test_random_shift_is_a_replicate_padded_crop_with_offsets_drawn_from_the_generator():
    B, C, H, W = 40, 2, 5, 6
    x = torch.arange(B * C * H * W, dtype=torch.float32).reshape(B, C, H, W)  # every pixel distinct
    assert U.random_shift(x, 0, torch.Generator()) is x
    assert U.random_shift(x, -1, torch.Generator()) is x
    for s in (1, 2):
        g = torch.Generator().manual_seed(123)  # not the global seed conftest sets: the draw must be g's
        out = U.random_shift(x, s, g)
        assert out.shape == x.shape and out.is_contiguous()
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        offs = [_offset_of(out[b], padded[b], s) for b in range(B)]
        ref = torch.Generator().manual_seed(123)
        want = torch.randint(0, 2 * s + 1, (2, B), generator=ref)
        assert offs == list(zip(want[0].tolist(), want[1].tolist()))  # rows from draw 0, columns from draw 1
        assert {o[0] for o in offs} == set(range(2 * s + 1)) and {o[1] for o in offs} == set(range(2 * s + 1))
        # it takes exactly 2 x B draws from g: what the epoch draws next (device dropout) replays
        assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=ref))


# -- lr schedule -------------------------------------------------------------------------------------------


def test_cosine_lr_warms_up_linearly_then_decays_to_one_percent():
    assert U.cosine_lr(0, 10, 2, 1.0) == 0.5
    assert U.cosine_lr(1, 10, 2, 1.0) == 1.0
    assert U.cosine_lr(2, 10, 2, 2.0) == 2.0  # decay starts at the peak
    assert U.cosine_lr(6, 10, 2, 1.0) == pytest.approx(0.505)  # half way: 0.01 + 0.99 * 0.5
    assert U.cosine_lr(4, 10, 2, 1.0) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert U.cosine_lr(10, 10, 2, 1.0) == pytest.approx(0.01)
    assert U.cosine_lr(50, 10, 2, 1.0) == pytest.approx(0.01)  # past the end it stays at the floor
    assert U.cosine_lr(0, 10, 0, 3.0) == 3.0  # no warm-up
    assert U.cosine_lr(0, 10, 1, 3.0) == 3.0 and U.cosine_lr(1, 10, 1, 3.0) == 3.0  # one warm-up step
    assert U.cosine_lr(5, 10, 0, 1.0, min_ratio=0.5) == pytest.approx(0.75)
    assert U.cosine_lr(3, 3, 3, 1.0) == 1.0  # total == warmup: t = 0, not a division by zero
    assert U.cosine_lr(4, 3, 3, 1.0) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi)))


# -- AdamW groups ------------------------------------------------------------------------------------------


class _Tok(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.dist_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 5, 4))
        self.other = torch.nn.Parameter(torch.zeros(1, 5, 4))
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_only_matrices_and_take_each_parameter_once():
    m = _Tok()
    shared = torch.nn.Sequential(m.lin)  # the same Linear reached twice
    groups = U.param_groups([m, shared], 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    ids = lambda ps: sorted(id(p) for p in ps)  # noqa: E731
    assert ids(groups[0]["params"]) == ids([m.lin.weight, m.other])
    assert ids(groups[1]["params"]) == ids([m.lin.bias, m.norm.weight, m.norm.bias, m.cls_token, m.dist_token,
                                            m.pos_embed])
    only = U.param_groups([torch.nn.Linear(2, 2, bias=False)], 0.1)
    assert len(only) == 1 and only[0]["weight_decay"] == 0.1 and len(only[0]["params"]) == 1


# -- argument checks ---------------------------------------------------------------------------------------


def test_real_accepts_the_closed_and_open_ends_as_asked():
    assert U.real("x", 0, lo=0) == 0.0 and isinstance(U.real("x", 1, lo=0), float)
    assert U.real("x", 1, hi=1) == 1.0 and U.real("x", 0.5, lo=0, hi=1, lo_open=True, hi_open=True) == 0.5
    assert U.real("x", -1e9) == -1e9
    for v, kw, msg in [(0, dict(lo=0, lo_open=True), "expected a number > 0, got 0.0"),
                       (-0.1, dict(lo=0), "expected a number >= 0, got -0.1"),
                       (1, dict(hi=1, hi_open=True), "expected a number < 1, got 1.0"),
                       (1.5, dict(hi=1), "expected a number <= 1, got 1.5"),
                       (2, dict(lo=0, hi=1), "expected a number >= 0 and <= 1, got 2.0"),
                       (math.nan, {}, "expected a finite number, got nan"),
                       (math.inf, {}, "expected a finite number, got inf"),
                       (True, {}, "expected a finite number, got True"),
                       ("1", {}, "expected a finite number, got '1'")]:
        with pytest.raises(ValueError) as e:
            U.real("the_arg", v, **kw)
        assert str(e.value) == f"the_arg: {msg}", (v, kw)


def test_count_accepts_ints_from_lo_only():
    assert U.count("n", 0) == 0 and U.count("n", 3, lo=3) == 3 and type(U.count("n", np.int64(2))) is int
    for v, lo in [(-1, 0), (2, 3), (1.0, 0), (True, 0), ("2", 0)]:
        with pytest.raises(ValueError) as e:
            U.count("the_n", v, lo=lo)
        assert str(e.value) == f"the_n: expected an int >= {lo}, got {v!r}"


# -- epoch plans ---------------------------------------------------------------------------------------------


def _g(seed=3):
    return torch.Generator().manual_seed(seed)


def test_shuffled_reads_a_seeded_permutation_in_global_batches():
    perm = torch.randperm(10, generator=_g()).tolist()
    one = S.shuffled(10, 4, _g())
    assert [b.tolist() for b in one.batches] == [perm[0:4], perm[4:8], perm[8:10]] and one.sizes == [[4], [4], [2]]
    assert len(one) == 3
    two = [S.shuffled(10, 4, _g(), rank=r, world=2) for r in range(2)]
    assert [b.tolist() for b in two[0].batches] == [perm[0:4:2], perm[4:8:2], perm[8:10:2]]
    assert [b.tolist() for b in two[1].batches] == [perm[1:4:2], perm[5:8:2], perm[9:10:2]]
    three = S.shuffled(9, 4, _g(), rank=2, world=3)  # the last global batch (1 index) is short of 3: dropped
    perm9 = torch.randperm(9, generator=_g()).tolist()
    assert [b.tolist() for b in three.batches] == [perm9[2:4:3], perm9[6:8:3]]
    ev = S.shuffled(10, 3, _g(), even=True)  # 3, 3, 3, 1 -> 2, 2, 2 (the 1 becomes empty and is skipped)
    assert [b.tolist() for b in ev.batches] == [perm[0:2], perm[3:5], perm[6:8]]
    assert ev.sizes == [[2], [2], [2]]
    exact = S.shuffled(8, 4, _g(), rank=1, world=4)  # the boundary: a last batch of exactly `world` is kept
    perm8 = torch.randperm(8, generator=_g()).tolist()
    assert [b.tolist() for b in exact.batches] == [[perm8[1]], [perm8[5]]]


def test_group_steps_is_the_largest_group_over_the_global_batch_rounded_up():
    assert S.group_steps([10, 3], 4) == 3
    assert S.group_steps([8, 3], 4) == 2
    assert S.group_steps([1], 4) == 1
    assert S.group_steps([0, 0], 4) == 1


def test_grouped_spreads_every_group_over_the_same_steps_in_group_order():
    a, b = torch.arange(0, 10), torch.arange(100, 104)
    g = _g()
    pa, pb = a[torch.randperm(10, generator=g)].tolist(), b[torch.randperm(4, generator=g)].tolist()
    plan = S.grouped([a, b], 4, _g())  # 3 steps: a 4 per step (4, 4, 2), b 2 per step (2, 2, 0)
    assert [x.tolist() for x in plan.batches] == [pa[0:4] + pb[0:2], pa[4:8] + pb[2:4], pa[8:10]]
    assert plan.sizes == [[4, 2], [4, 2], [2, 0]]
    r1 = S.grouped([a, b], 4, _g(), rank=1, world=2)
    assert [x.tolist() for x in r1.batches] == [pa[1:4:2] + pb[1:2], pa[5:8:2] + pb[3:4], pa[9:10]]
    assert r1.sizes == [[2, 1], [2, 1], [1, 0]]
    ev = S.grouped([a, b], 4, _g(), rank=1, world=2, even=True)
    assert ev.sizes == [[2, 0], [2, 0], [0, 0]]
    assert [x.tolist() for x in ev.batches] == [pa[1:4:2], pa[5:8:2], []]


def test_sequential_gives_each_process_its_contiguous_share_in_order():
    whole = S.sequential(7, 3)
    assert [b.tolist() for b in whole.batches] == [[0, 1, 2], [3, 4, 5], [6]] and whole.sizes == [[3], [3], [1]]
    shares = [[b.tolist() for b in S.sequential(7, 2, rank=r, world=3).batches] for r in range(3)]
    assert shares == [[[0, 1]], [[2, 3]], [[4, 5], [6]]]  # 7*r//3: 0, 2, 4, 7


def test_steps_per_epoch_rounds_micro_batches_up_to_whole_steps():
    assert steps_per_epoch(5, 2) == 3 and steps_per_epoch(4, 2) == 2 and steps_per_epoch(1, 4) == 1
    assert steps_per_epoch(0, 1) == 1
