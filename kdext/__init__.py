"""kdext: fused, exact kernels for knowledge distillation of language models.

The ops live under ``torch.ops.kdext``; this package registers their fake
kernels and autograd formulas and exposes the Python API.

Each op family's module is named by its stem (divergence, softmax, logprobs,
top_p_sample, sparse). Where an op has its module's name (``softmax``, ``logprobs``,
``top_p_sample``), the package attribute is the function: ``kdext.top_p_sample(...)``
samples, while ``from kdext.top_p_sample import SampleResult`` and
``importlib.import_module("kdext.top_p_sample")`` reach the module (the import system
finds it in ``sys.modules``; ``import kdext.top_p_sample as m`` binds the function).
"""

from ._ops import BUILD_INFO, ops
from .divergence import distill_loss, forward_kl, jsd, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd
from .logprobs import logprobs
from .top_p_sample import SampleResult, top_p_sample
from .softmax import entropy, log_softmax, logsumexp, softmax
from .sparse import sparse_distill_loss, topk_logprobs
from . import parallel  # noqa: E402  (needs the ops registered above)

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO",
    "SampleResult",
    "distill_loss",
    "entropy",
    "forward_kl",
    "jsd",
    "log_softmax",
    "logprobs",
    "logsumexp",
    "ops",
    "parallel",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "softmax",
    "sparse_distill_loss",
    "top_p_sample",
    "topk_logprobs",
    "tvd",
]
