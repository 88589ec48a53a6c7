"""The random streams of a run, each named, each a function of ``--seed`` (and the step).

Every random decision of the trainer and of ``kdext eval`` draws from its own stream, so no two
decisions share random numbers and a resumed run (or N DDP processes) repeats them exactly:

=====================  =========================================================================
stream                 seed
=====================  =========================================================================
data order             ``torch.Generator`` seeded :func:`data_order_seed` (seed, epoch)
global torch / random  ``torch.manual_seed(seed)``, ``random.seed(seed)``: dropout; saved in
                       checkpoints and restored on resume
SeqKD rollouts         ``stream_seed(seed, Stream.SEQKD_ROLLOUT, step)``
GKD rollouts           ``stream_seed(seed, Stream.GKD_ROLLOUT, step)``
MiniLLM rollouts       ``stream_seed(seed, Stream.MINILLM_ROLLOUT, step)``
evaluation sampling    ``stream_seed(seed, Stream.EVAL_SAMPLING)``
GKD's coin             ``stream_seed(seed, Stream.GKD_COIN, step)``: on-policy or not this step
DistiLLM rollouts      ``stream_seed(seed, Stream.DISTILLM_ROLLOUT, step)``: fresh student samples
DistiLLM's coin        ``stream_seed(seed, Stream.DISTILLM_COIN, step)``: fresh, replayed or data
DistiLLM replay        ``stream_seed(seed, Stream.DISTILLM_REPLAY, step)``: which buffer rows
MiniLLM reshuffle      ``stream_seed(seed, Stream.MINILLM_SHUFFLE, cycle, ppo_epoch)``: the
                       rollout buffer's order in each PPO epoch
LM data order          ``DataSchedule`` of ``--lm-data`` seeded ``stream_seed(seed, Stream.LM_DATA)``
hidden projection      ``stream_seed(seed, Stream.HIDDEN_INIT)``: its initial weights
=====================  =========================================================================

A rollout seed is further split per generated position and per row inside ``generation.sample``
(Philox key ``mix_seed(seed, position)``, subsequence = the row's position in the global batch).

GKD's coin once used the GKD rollouts' seed ``mix_seed(seed, 2, step)``. The two did not
correlate in practice (the coin is a Mersenne Twister seeded with that value, the rollouts a
Philox stream keyed by a further hash of it), but only because the generators differ: the coin
now has a stream of its own. That changed which steps GKD trains on-policy (not its samples).
"""

from __future__ import annotations

import enum

_SEED_MASK = (1 << 62) - 1
_U64 = (1 << 64) - 1


class Stream(enum.IntEnum):
    """Tags of the ``mix_seed`` streams (the values are part of every run's results: keep them)."""

    SEQKD_ROLLOUT = 1
    GKD_ROLLOUT = 2
    MINILLM_ROLLOUT = 3
    EVAL_SAMPLING = 4
    GKD_COIN = 5
    DISTILLM_ROLLOUT = 6
    DISTILLM_COIN = 7
    DISTILLM_REPLAY = 8
    MINILLM_SHUFFLE = 9
    LM_DATA = 10
    HIDDEN_INIT = 11


def mix_seed(*parts: int) -> int:
    """A well-spread 62-bit seed from integers (splitmix64 steps): nearby inputs, unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _U64)) & _U64
        x = (x + 0x9E3779B97F4A7C15) & _U64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        x = z ^ (z >> 31)
    return x & _SEED_MASK


def stream_seed(seed: int, stream: Stream, *parts: int) -> int:
    """The seed of one stream of the run seeded ``seed`` (e.g. at one step)."""
    return mix_seed(seed, int(stream), *parts)


def data_order_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s permutation of the data: ``seed * 1000003 + epoch``, folded
    into the 64 bits ``torch.Generator.manual_seed`` takes (a no-op for seeds below 1.8e13)."""
    return (seed * 1_000_003 + epoch) & _U64
