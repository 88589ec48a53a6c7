"""Vocab-parallel top_p_sample: the single-device op's draw, from this rank's shard of the logits.

The single-device op (kdext/top_p_sample.py, csrc/cpu/top_p_sample.cpp) runs, per
row, the sort-free threshold search of csrc/include/kdext/top_p.h. Here every
rank runs the very same search (``_Search`` is a line-by-line, row-vectorised
port of the C++ ThresholdSearch, in the same float32 arithmetic) on the row sums
of all ranks: each round, every rank reduces its shard's r at the same K pivots
and the ranks all-gather those sums (4K numbers per active row), then combine
them in rank order, so every rank holds bit-identical state, takes the same
steps and issues the same collectives. The uniforms come from a Python port of
Philox4x32-10 (``philox_uniform``), bit-identical to the kernels'.
"""

import math

import torch
import torch.distributed as dist

from ..top_p_sample import SampleResult, check_args, philox_seed_offset
from .collectives import all_gather, check_group, local_lse64, merge_lse

SEARCH_PIVOTS = 16  # K: pivots per round; payload 4K float64 per active row and round
_MAX_ROUNDS = 64  # top_p.h's kMaxRounds guard (never reached, see search_round_bound)
_FLT_MIN = 1.1754943508222875e-38  # std::numeric_limits<float>::min()
_M32 = 0xFFFFFFFF


def search_round_bound(k=SEARCH_PIVOTS):
    """Rounds one threshold search can take (top_p.h): the bracket's width in float bit patterns,
    < 2^31, shrinks to <= ceil(width / (K + 1)) each round; one more round for the first round's
    bound hints, one for the last step to a single value."""
    return math.ceil(31 / math.log2(k + 1)) + 2


def _f32(x):
    return torch.tensor(x, dtype=torch.float32)


def _bits(x):
    """The bit pattern of float32 values >= 0 as int64 (ordered as the values)."""
    return x.contiguous().view(torch.int32).to(torch.int64)


def _from_bits(b):
    return b.to(torch.int32).view(torch.float32)


def _next_below(x):
    return torch.where(x > 0, _from_bits(_bits(x) - 1), torch.zeros_like(x))


# --- Philox4x32-10 (csrc/include/kdext/philox.h) on int64 tensors ---------------------------

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a, b):
    """(lo, hi) 32-bit words of a * b for a: a Python int < 2^32, b: int64 tensor in [0, 2^32)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p0 = b_lo * a  # < 2^48
    p1 = b_hi * a  # < 2^48;  a * b = p0 + p1 * 2^16
    low = p0 + ((p1 & 0xFFFF) << 16)  # < 2^49
    return low & _M32, (p1 >> 16) + (low >> 32)


def philox4x32_10(counter, key0, key1):
    """Philox4x32-10 of the counters ``counter`` (4 int64 tensors of 32-bit words) under (key0, key1)."""
    c0, c1, c2, c3 = counter
    for i in range(10):
        if i > 0:
            key0, key1 = (key0 + _PHILOX_W0) & _M32, (key1 + _PHILOX_W1) & _M32
        lo0, hi0 = _mulhilo(_PHILOX_M0, c0)
        lo1, hi1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
    return c0, c1, c2, c3


def philox_uniform(seed, offset, row):
    """float32 u of every row, = uniform_open01(philox_block(seed, row id, offset).v[0]) of the
    kernels; ``row``: the rows' ids (int64; a negative id is its two's-complement uint64)."""
    seed, offset = seed % (1 << 64), offset % (1 << 64)
    device = row.device
    full = torch.full_like(row, 0)
    counter = (full + (offset & _M32), full + (offset >> 32), row & _M32, (row >> 32) & _M32)
    word = philox4x32_10(counter, seed & _M32, seed >> 32)[0]
    # ((word >> 9) << 1 | 1) * 2^-24: exact in float32
    return (((word >> 9) << 1) | 1).to(torch.float32) * _f32(2.0**-24).to(device)


# --- the threshold search of top_p.h, vectorised over rows ----------------------------------


class _Search:
    """ThresholdSearch (top_p.h) for a batch of rows; float32 state as in the C++ struct.

    ``rank_lo_mass`` ([W, rows], float64) is each rank's share of F(lo): since no value of
    the row lies in (lo, lo_next), it is the rank's mass of r >= lo_next, which, once the
    search is done, is its kept mass (used by the draw, so the draw needs no collective of
    its own to find the shard whose interval holds u * kept_mass).
    """

    FIELDS = ("target", "lo", "hi", "lo_mass", "lo_count", "hi_mass", "hi_count", "lo_next", "hi_data",
              "rounds", "rank_lo_mass")

    def __init__(self, by_count, **fields):
        self.by_count = by_count
        self.starts_narrow = False
        for name in self.FIELDS:  # own copies: update() writes rows in place
            setattr(self, name, fields[name].clone())

    @classmethod
    def over_row(cls, target, by_count, tot, rank_mass):
        zero = torch.zeros_like(tot["mass"])
        return cls(by_count, target=target, lo=zero, hi=tot["max"], lo_mass=tot["mass"], lo_count=tot["count"],
                   hi_mass=zero, hi_count=zero.clone(), lo_next=tot["min_pos"], hi_data=tot["max"],
                   rounds=torch.zeros(zero.shape, dtype=torch.int64, device=zero.device), rank_lo_mass=rank_mass)

    @classmethod
    def above(cls, target, by_count, first, tot, rank_mass, rows):
        """top_p.h's above() on the rows ``rows`` (bool), over_row() on the others."""
        s = cls.over_row(target, by_count, tot, rank_mass)
        s.lo = torch.where(rows, _next_below(first.threshold), s.lo)
        s.lo_mass = torch.where(rows, first.lo_mass, s.lo_mass)
        s.lo_count = torch.where(rows, first.lo_count, s.lo_count)
        s.lo_next = torch.where(rows, first.threshold, s.lo_next)
        s.rank_lo_mass = torch.where(rows, first.rank_lo_mass, s.rank_lo_mass)
        s.starts_narrow = True  # the bracket starts at what top-k kept: compact before round 1
        return s

    @property
    def threshold(self):
        return self.lo_next

    def done(self):
        return ~(self.lo_next < self.hi_data)

    def pivots(self, idx, k):
        """The K pivots ([n, K], ascending) of the rows ``idx``, as ThresholdSearch::pivots."""
        a, b = self.lo_next[idx], self.hi_data[idx]
        first = self.rounds[idx] == 0
        target, lo_mass = self.target[idx], self.lo_mass[idx]
        if not self.by_count:
            n = self.lo_count[idx] - self.hi_count[idx]
            h = _f32(0.5) * (lo_mass - target) / n
            a = torch.where(first & (n > 0) & (h > a) & (h < b), h, a)
        else:
            h = _f32(1.0001) * lo_mass / target
            b = torch.where(first & (target > 0) & (h > a) & (h < b), h, b)
        blo = _bits(a)
        span = _bits(b) - blo
        j = torch.arange(1, k + 1, dtype=torch.int64, device=a.device)
        return _from_bits(blo.unsqueeze(-1) + span.unsqueeze(-1) * j // (k + 1))

    def update(self, idx, v, mass, count, min_above, max_below, rank_mass):
        """ThresholdSearch::update of the rows ``idx`` with the combined sums at the pivots v
        ([n, K] float32 each; ``rank_mass`` [W, n, K] float64, each rank's share of ``mass``)."""
        k = v.shape[-1]
        below = (count if self.by_count else mass) < self.target[idx].unsqueeze(-1)
        # j = the first pivot with F(v_j) < target (a suffix of the pivots: F is monotone), K if none
        j = torch.where(below.any(-1), below.to(torch.int8).argmax(-1), torch.full_like(idx, k))
        has_hi, has_lo = j < k, j > 0
        jh = j.clamp(max=k - 1).unsqueeze(-1)
        jl = (j - 1).clamp(min=0).unsqueeze(-1)

        def at(x, jj):
            return x.gather(-1, jj).squeeze(-1)

        lo_next = self.lo_next[idx]
        hi_data = self.hi_data[idx]
        hi_data = torch.where(has_hi, torch.minimum(hi_data, torch.maximum(at(max_below, jh), lo_next)), hi_data)
        lo_next = torch.where(has_lo, torch.maximum(lo_next, torch.minimum(at(min_above, jl), hi_data)), lo_next)
        rounds = self.rounds[idx] + 1
        hi_data = torch.where(rounds >= _MAX_ROUNDS, lo_next, hi_data)  # force_finish(), never needed
        self.hi[idx] = torch.where(has_hi, at(v, jh), self.hi[idx])
        self.hi_mass[idx] = torch.where(has_hi, at(mass, jh), self.hi_mass[idx])
        self.hi_count[idx] = torch.where(has_hi, at(count, jh), self.hi_count[idx])
        self.lo[idx] = torch.where(has_lo, at(v, jl), self.lo[idx])
        self.lo_mass[idx] = torch.where(has_lo, at(mass, jl), self.lo_mass[idx])
        self.lo_count[idx] = torch.where(has_lo, at(count, jl), self.lo_count[idx])
        w = rank_mass.shape[0]
        self.rank_lo_mass[:, idx] = torch.where(
            has_lo, rank_mass.gather(-1, jl.expand(w, -1, -1).contiguous()).squeeze(-1), self.rank_lo_mass[:, idx])
        self.lo_next[idx] = lo_next
        self.hi_data[idx] = hi_data
        self.rounds[idx] = rounds


def _local_pivot_sums(x, v, base):
    """This shard's four reductions of a round (PivotSums) at the pivots v [n, K]: [n, 4, K]
    float64 (mass above, count above, min above, max of 0 < r <= v), over the shard's values
    ``x`` [n, L] of the compaction window (lo_c, hi_c] (zero-padded) plus ``base`` [n, 4], what
    the shard holds outside it (mass and count of r > hi_c, min of r > hi_c, max of 0 < r <= lo_c).
    One bucketing of x (searchsorted against the K pivots) and scatter reductions: O(L log K)."""
    n, k = v.shape
    bucket = torch.searchsorted(v.contiguous(), x)  # = #{j : v_j < x_i}: x_i > v_j iff j < bucket
    x64 = x.to(torch.float64)
    zeros = x64.new_zeros((n, k + 1))
    mass_b = zeros.scatter_add(1, bucket, x64)
    count_b = zeros.scatter_add(1, bucket, (x > 0).to(torch.float64))
    min_b = x.new_full((n, k + 1), math.inf).scatter_reduce(1, bucket, x, "amin", include_self=True)
    max_b = x.new_zeros((n, k + 1)).scatter_reduce(1, bucket, x, "amax", include_self=True)

    def suffix_sum(y):  # sum over buckets j + 1 .. K, for j = 0 .. K-1
        return y[:, 1:].flip(-1).cumsum(-1).flip(-1)

    min_above = min_b[:, 1:].flip(-1).cummin(-1).values.flip(-1).to(torch.float64)
    max_below = max_b[:, :k].cummax(-1).values.to(torch.float64)  # padding (bucket 0) adds 0
    return torch.stack((suffix_sum(mass_b) + base[:, :1], suffix_sum(count_b) + base[:, 1:2],
                        torch.minimum(min_above, base[:, 2:3]), torch.maximum(max_below, base[:, 3:4])), dim=1)


class _Window:
    """This rank's values of each row of a search, compacted to the search's bracket.

    Purely local (it changes what a rank scans, not what it sends): ``x`` [rows, L] holds the
    shard's values in (lo_c, hi_c] of the last compaction (zero-padded), ``base`` [rows, 4] what
    lies outside (see _local_pivot_sums), so the sums at any pivot in (lo_c, hi_c] are exact. A
    round scans L values per row instead of V_local; the bracket shrinks ~K-fold per round, so
    the list does too, as in the CPU kernel's compaction.
    """

    def __init__(self, r):
        self.x = r
        rows = r.shape[0]
        self.base = torch.zeros((rows, 4), dtype=torch.float64, device=r.device)
        self.base[:, 2] = math.inf

    def compact(self, st, idx):
        if self.x.shape[-1] == 0:
            return  # this shard holds no value of the windows any more
        x = self.x[idx]
        lo, hi = st.lo[idx].unsqueeze(-1), st.hi[idx].unsqueeze(-1)
        inside = (x > lo) & (x <= hi)
        counts = inside.sum(-1)
        width = int(counts.max()) if counts.numel() else 0
        if width > x.shape[-1] // 2:
            return  # a copy of most of the list would not pay
        above, below = x > hi, (x > 0) & (x <= lo)
        x64 = x.to(torch.float64)
        base = self.base[idx]
        base[:, 0] += torch.where(above, x64, 0.0).sum(-1)
        base[:, 1] += above.sum(-1).to(torch.float64)
        base[:, 2] = torch.minimum(base[:, 2], torch.where(above, x, math.inf).amin(-1).to(torch.float64))
        base[:, 3] = torch.maximum(base[:, 3], torch.where(below, x, 0.0).amax(-1).to(torch.float64))
        pos = torch.where(inside, inside.cumsum(-1) - 1, width)  # outside values go to a dropped column
        out = x.new_zeros((x.shape[0], width + 1)).scatter_(1, pos, x)[:, :width]
        # rows no longer searching keep nothing
        self.x = x.new_zeros((self.x.shape[0], width)).index_copy_(0, idx, out)
        self.base = self.base.index_copy(0, idx, base)


def _run_search(st, r, group, k=SEARCH_PIVOTS):
    """Rounds until every row's search is done; one all-gather of [active rows, 4, K] float64 each."""
    rounds = 0
    window = _Window(r)
    while True:
        idx = (~st.done()).nonzero().squeeze(-1)  # the same on every rank (identical state)
        if idx.numel() == 0:
            return rounds
        if rounds > 0 or st.starts_narrow:
            window.compact(st, idx)
        rounds += 1
        v = st.pivots(idx, k)
        parts = all_gather(_local_pivot_sums(window.x[idx], v, window.base[idx]), group)  # [W, n, 4, K]
        rank_mass = parts[:, :, 0]
        mass = rank_mass.sum(0).to(torch.float32)  # rank order: the same sum on every rank
        count = parts[:, :, 1].sum(0).to(torch.float32)
        min_above = parts[:, :, 2].amin(0).to(torch.float32)
        max_below = parts[:, :, 3].amax(0).to(torch.float32)
        st.update(idx, v, mass, count, min_above, max_below, rank_mass)


def _check_sample_args(logits, teacher_logits, top_p, top_k, temperature, alpha, generator, seed, row_ids, group):
    check_args(logits, teacher_logits, top_p, top_k, temperature, alpha, row_ids)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator to top_p_sample, not both")
    check_group(group)


def top_p_sample(
    logits,
    top_p=1.0,
    top_k=0,
    temperature=1.0,
    teacher_logits=None,
    alpha=0.0,
    generator=None,
    seed=None,
    row_ids=None,
    group=None,
):
    """kdext.top_p_sample over a vocab-sharded row: the same :class:`~kdext.SampleResult` on every rank.

    Same arguments and semantics as :func:`kdext.top_p_sample`; ``logits`` (and
    ``teacher_logits``) are this rank's shard, and the returned tokens are global ids.
    Every rank must pass the same hyper-parameters and ``row_ids``, and a teacher on all
    ranks or none.

    Random numbers: the Philox stream (seed, offset) of the group's first rank is used by
    every rank; each rank's ``generator`` (or default generator) is advanced exactly as the
    single-device op advances it. So with ``seed=n`` (the same on every rank: checked) or a
    first rank whose generator is in the state the single-device call would see, the uniforms
    are bit-identical to the single-device op's.

    What equals the single-device op (CPU kernel) on the full logits:
      * u, the Philox uniform of each row: bit-identical (same stream mapping);
      * the threshold search: the same steps in the same float32 arithmetic as top_p.h,
        but over r computed here as float32(float64 formula) where the kernel uses its
        vectorised float32 exp; r, hence the threshold (a value of r), the kept mass and
        sample_logprob agree to a few float32 ulps, not bit for bit;
      * the kept set and the token: identical unless a token's F lies within float32
        rounding of the top-p/top-k target, or u * kept_mass within rounding of a CDF
        boundary (the cases where any two float32 implementations may differ);
      * student / teacher log-probs: from the float64 global lse (the exact merge), to
        float32 rounding.
    """
    _check_sample_args(logits, teacher_logits, top_p, top_k, temperature, alpha, generator, seed, row_ids, group)

    device = logits.device
    shape = logits.shape[:-1]
    v_local = logits.shape[-1]
    seed64, offset = philox_seed_offset(device, generator, seed)
    # Collective 1 (O(W), independent of rows): shard sizes, and every rank's (seed, offset).
    meta = all_gather(torch.tensor([v_local, seed64, offset], dtype=torch.int64, device=device), group).tolist()
    world, rank = len(meta), dist.get_rank(group)
    vocab = sum(m[0] for m in meta)
    lo = sum(m[0] for m in meta[:rank])
    if vocab >= 1 << 24:
        raise ValueError(f"logits has a vocabulary of {vocab} entries; top_p_sample supports fewer than 2^24")
    if seed is not None and any(m[1] != seed64 for m in meta):
        raise ValueError("top_p_sample: the ranks of the group passed different seeds")
    seed64, offset = meta[0][1], meta[0][2]

    s = logits.detach().reshape(-1, v_local).to(torch.float32).contiguous()
    t = None if teacher_logits is None else teacher_logits.detach().reshape(-1, v_local).to(torch.float32).contiguous()
    rows = s.shape[0]
    f32 = dict(dtype=torch.float32, device=device)
    nan = torch.full((rows,), math.nan, **f32)
    if rows == 0:
        empty = torch.empty(shape, dtype=torch.int64, device=device)
        return SampleResult(empty, nan.view(shape), nan.view(shape), nan.view(shape), nan.view(shape))

    # Collective 2: the global log-normalisers, float64 (the exact merge).
    local = [local_lse64(s, temperature)]
    if t is not None:
        local.append(local_lse64(t, temperature))
    lse = merge_lse(all_gather(torch.stack(local, dim=-1), group))  # [rows, 1 or 2]
    lse_s = lse[:, 0]
    lse_t = lse[:, 1] if t is not None else torch.full_like(lse_s, math.nan)

    # r on the shard: top_p.h's mixture_prob (a side of weight 0 skipped; r < FLT_MIN flushed),
    # formed in float64 from x = s * (1/T) in float32 (as the kernels) and rounded to float32.
    a32 = float(_f32(float(alpha)))
    w_s, w_t = float(_f32(1.0) - _f32(a32)), a32
    use_s, use_t = a32 < 1.0, a32 > 0.0
    inv_t = _f32(1.0 / temperature).to(device)
    x = s * inv_t
    y = t * inv_t if t is not None else None
    valid = torch.ones(rows, dtype=torch.bool, device=device)
    r64 = torch.zeros(s.shape, dtype=torch.float64, device=device)
    if use_s:
        valid &= torch.isfinite(lse_s)
        r64 += w_s * torch.exp(x.to(torch.float64) - lse_s.unsqueeze(-1))
    if use_t:
        valid &= torch.isfinite(lse_t)
        r64 += w_t * torch.exp(y.to(torch.float64) - lse_t.unsqueeze(-1))
    r = r64.to(torch.float32)
    r = torch.where(valid.unsqueeze(-1) & (r >= _FLT_MIN), r, torch.zeros_like(r))

    # Collective 3: the row totals (RowTotals), each rank's in float64, combined in rank order.
    pos = r > 0
    tot_local = torch.stack((r.to(torch.float64).sum(-1), pos.sum(-1).to(torch.float64),
                             r.amax(-1).to(torch.float64),
                             torch.where(pos, r, torch.full_like(r, math.inf)).amin(-1).to(torch.float64)), dim=-1)
    tot_parts = all_gather(tot_local, group)  # [W, rows, 4]
    rank_mass = tot_parts[..., 0]
    tot = {"mass": rank_mass.sum(0).to(torch.float32), "count": tot_parts[..., 1].sum(0).to(torch.float32),
           "max": tot_parts[..., 2].amax(0).to(torch.float32), "min_pos": tot_parts[..., 3].amin(0).to(torch.float32)}
    valid &= (tot["count"] > 0) & (tot["mass"] > 0)

    # Collectives 4..: the threshold searches (top-k by count, then top-p by mass over what it kept).
    threshold, kept_mass, kept_rank_mass = tot["min_pos"], tot["mass"], rank_mass
    k_active = valid & (_f32(float(top_k)) < tot["count"]) if top_k > 0 else torch.zeros_like(valid)
    never = ~valid  # rows that take no search: marked done
    k_search = _Search.over_row(torch.full_like(tot["mass"], float(top_k)), True, tot, rank_mass.clone())
    if top_k > 0:
        _mark_done(k_search, ~k_active)
        _run_search(k_search, r, group)
        threshold = torch.where(k_active, k_search.threshold, threshold)
        kept_mass = torch.where(k_active, k_search.lo_mass, kept_mass)
        kept_rank_mass = torch.where(k_active, k_search.rank_lo_mass, kept_rank_mass)
    if float(top_p) < 1.0:
        target = (float(top_p) * kept_mass.to(torch.float64)).to(torch.float32)
        p_search = _Search.above(target, False, k_search, tot, rank_mass.clone(), k_active)
        _mark_done(p_search, never)
        _run_search(p_search, r, group)
        threshold = torch.where(valid, p_search.threshold, threshold)
        kept_mass = torch.where(valid, p_search.lo_mass, kept_mass)
        kept_rank_mass = torch.where(valid, p_search.rank_lo_mass, kept_rank_mass)

    # The draw: target u * kept_mass (as the kernel: float32 u and mass, product in float64);
    # the owner is the rank whose interval [P_w, P_w + m_w) of the exclusive prefix over ranks
    # of the kept masses holds it (every rank knows all m_w from the search); it inverts its
    # local CDF in vocabulary order (float64 running sum), and the last kept token is taken
    # if rounding leaves the total just short, as the kernel does.
    ids = (torch.arange(rows, dtype=torch.int64, device=device) if row_ids is None
           else row_ids.reshape(-1).to(torch.int64))
    u = philox_uniform(seed64, offset, ids)
    goal = u.to(torch.float64) * kept_mass.to(torch.float64)
    incl = kept_rank_mass.cumsum(0)  # [W, rows]: P_w + m_w
    excl = torch.cat((torch.zeros_like(incl[:1]), incl[:-1]), dim=0)  # P_w
    beyond = incl > goal.unsqueeze(0)
    has_mass = kept_rank_mass > 0
    last_with_mass = (world - 1) - has_mass.flip(0).to(torch.int8).argmax(0)
    owner = torch.where(beyond.any(0), beyond.to(torch.int8).argmax(0), last_with_mass)
    local_goal = goal - excl[rank]
    kept = r >= threshold.unsqueeze(-1)
    cdf = torch.where(kept, r, torch.zeros_like(r)).to(torch.float64).cumsum(-1)
    over = kept & (cdf > local_goal.unsqueeze(-1))
    index = torch.arange(v_local, device=device)
    last_kept = torch.where(kept, index, torch.full_like(index, -1)).amax(-1)
    local_tok = torch.where(over.any(-1), over.to(torch.int8).argmax(-1), last_kept)
    mine = valid & (owner == rank) & (local_tok >= 0)
    at = local_tok.clamp(min=0).unsqueeze(-1)
    picked_x = x.gather(-1, at).squeeze(-1).to(torch.float64) - lse_s
    picked_y = (y.gather(-1, at).squeeze(-1).to(torch.float64) - lse_t) if y is not None else lse_t
    picked = torch.stack(((local_tok + lo).to(torch.float64), picked_x, picked_y,
                          r.gather(-1, at).squeeze(-1).to(torch.float64)), dim=-1)
    nothing = torch.tensor([-1.0, math.nan, math.nan, math.nan], dtype=torch.float64, device=device)
    picked = torch.where(mine.unsqueeze(-1), picked, nothing)
    # Collective last: the owner's (token, x_tok/T - lse_s, y_tok/T - lse_t, r_tok); the others
    # send (-1, NaN, ...) and every rank takes the owner's row (a copy, so all ranks agree).
    got = all_gather(picked, group).gather(0, owner.view(1, rows, 1).expand(1, rows, 4)).squeeze(0)
    tokens = torch.where(valid, got[:, 0].to(torch.int64), torch.full((rows,), -1, dtype=torch.int64, device=device))
    ok = valid & (tokens >= 0)
    tokens = torch.where(ok, tokens, torch.full_like(tokens, -1))
    student_lp = torch.where(ok, got[:, 1].to(torch.float32), nan)
    teacher_lp = torch.where(ok, got[:, 2].to(torch.float32), nan)
    sample_lp = torch.where(ok, torch.log(got[:, 3].to(torch.float32)) - torch.log(kept_mass), nan)
    thr = torch.where(ok, threshold, nan)
    return SampleResult(tokens.view(shape), student_lp.view(shape), teacher_lp.view(shape), sample_lp.view(shape),
                        thr.view(shape))


def _mark_done(st, rows):
    """Takes the rows ``rows`` out of a search (done(): lo_next >= hi_data)."""
    st.hi_data = torch.where(rows, st.lo_next, st.hi_data)
