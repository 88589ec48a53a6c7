"""Vocab-parallel ops over ``torch.distributed``: the LM head split across ranks.

With tensor parallelism each rank of a process group holds ``logits[..., lo:hi]``,
its own shard of the vocabulary (shards in rank order, sizes may differ). Every
op here takes that local shard plus ``group`` (``None``: the default process
group) and returns exactly what the single-device op of the same name returns
on the concatenated logits:

* per-row results (divergences, entropy, log-sum-exp, log-probs, the loss) are
  the same on every rank;
* ``softmax`` / ``log_softmax`` return the local slice of the full output;
* gradients are the local slice of the full gradient.

How (docs/DESIGN.md, "Vocab-parallel contract"): rank-local kernels compute the
partial state of the shard, and ranks combine states with collectives over
O(rows) numbers; no collective ever moves the logits. The collective schedule
of each op (``W`` ranks, ``a`` = 4 bytes, 8 for float64 inputs; "gather n" =
an all-gather of n numbers per row from every rank, "sum n" = an all-reduce
SUM of n numbers per row):

==================  ======================================  =====================  ==========
op                  forward                                 backward               payload/row
==================  ======================================  =====================  ==========
divergences         gather 2 (lse_s, lse_t); sum 3          none                   5a
  (value, c_s, c_t)
distill_loss        as the divergences                      none                   5a
logsumexp           gather 1 (lse, float64)                 none                   8
softmax             gather 1 (lse, float64)                 sum 1 (sum g*y)        8 + a
log_softmax         gather 1 (lse, float64)                 sum 1 (sum g)          8 + a
entropy             gather 1 (lse, float64); sum 1          none                   8 + a
                    (the shard's -sum q log q)
logprobs            gather the W shard sizes (int64, 8 B    none                   16
                    per rank per call); gather 2 (lse,
                    the owner's x_token/T; float64)
top_p_sample        gather (V_local, seed, offset) (int64,  (not differentiable)   8 (16 with
                    24 B per rank per call); gather 1 or 2                         a teacher)
                    (lse_s[, lse_t], float64); gather 4                            + 64 + 4K*8
                    (row totals, float64); per search                              per round
                    round, gather 4K (K = 16 pivots' mass,
                    count, min above, max below, float64)
                    of the rows still searching; gather 4
                    (the owner's token, log q, log p, r)
==================  ======================================  =====================  ==========

(payload = bytes this rank contributes per row; an all-gather hands every rank
W times its input.) ``top_p_sample`` runs at most ``search_round_bound()`` = 10
rounds per threshold search (one search for top-p or top-k, two for both; typically
3 to 5 each), so it moves at most 24 + rows * (16 + 64 + 2 * 10 * 512)
bytes per rank and call, whatever V; its all-gathers are reduced by every rank in
rank order, so every rank holds the same search state and issues the same
collectives. The divergences exchange float32 lse's, as precise as the
float32 statistics their single-device kernels keep; the softmax family and
log-probs exchange them in float64, because their single-device kernels form
(x/T - max) - log Z, exact however large the logits. The shard offsets, which only ``logprobs`` and
``top_p_sample`` need (token ids are global), come from one all-gather of the W
shard sizes per call: O(W) bytes, independent of rows and V. They are not
cached, so nothing can go stale when a caller changes the split.

Usage rules of every op here (as for any collective):

* every rank of ``group`` calls the same ops in the same order, with the same
  leading (row) shape, the same hyper-parameters and the same labels / masks /
  tokens; only the last dimension differs;
* ``backward`` of ``softmax``/``log_softmax`` runs a collective, so every rank
  must run it (the divergences', entropy's and logprobs' backward need none);
* argument errors are raised before the first collective, on every rank alike
  when the arguments agree across ranks.

``count_collectives()`` records the calls and bytes of the collectives issued
by this package (used by the benchmark; the tests count independently by
wrapping ``torch.distributed``).

Layout (one module per op family, as the single-device ops):

* ``collectives``: the two collectives every op goes through, ``count_collectives``,
  the process-group checks, ``shard_range`` and the exact merge of per-shard
  log-normalisers (``merge_lse``, ``local_lse64``);
* ``divergence``: the six divergences and ``distill_loss``;
* ``softmax``: ``softmax``, ``log_softmax``, ``logsumexp``, ``entropy``;
* ``logprobs``: ``logprobs`` of global token ids;
* ``top_p_sample``: ``top_p_sample`` (the threshold search of top_p.h and Philox,
  row-vectorised in torch).

As in ``kdext``, where an op has its module's name the package attribute is the
function (``kdext.parallel.softmax(...)``); ``from kdext.parallel.top_p_sample import
search_round_bound`` imports from the module. docs/PARALLEL.md has the same schedule
with the bytes per row.
"""

from .collectives import count_collectives, shard_range
from .divergence import distill_loss, forward_kl, jsd, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd
from .logprobs import logprobs
from .softmax import entropy, log_softmax, logsumexp, softmax
from .top_p_sample import top_p_sample

__all__ = [
    "count_collectives",
    "distill_loss",
    "entropy",
    "forward_kl",
    "jsd",
    "log_softmax",
    "logprobs",
    "logsumexp",
    "reverse_kl",
    "shard_range",
    "skew_forward_kl",
    "skew_reverse_kl",
    "softmax",
    "top_p_sample",
    "tvd",
]
