"""FSDP2 sharding of the run's models (``--fsdp``): which units, which precision, where the shards live.

Every model is cut into FSDP units bottom-up: one per decoder layer (the modules whose class
transformers names in ``model._no_split_modules``, as accelerate does), the LM head as a unit of
its own when it is not tied to the input embeddings, then the root (embeddings, final norm,
and a tied head). A unit's parameters are stored as dim-0 shards (DTensors on the mesh) and
all-gathered just before its forward; after it they are freed again (resharded), so a process
holds one layer's full parameters at a time besides its shards.

* **Student** (trained): the root keeps its parameters gathered from forward to backward (FSDP's
  default for a root); the layers reshard after forward and gather again in backward. Gradients
  are reduce-scattered after every micro-batch's backward (no unsharded gradient is kept
  between micro-batches) and averaged over the processes, as DDP does; AdamW then updates each
  process's shards only, so its moments are sharded too. On CUDA with bf16 (the default)
  parameters are gathered and computed in bf16 and gradients reduced in fp32 into the fp32
  shards, which are AdamW's master weights (``MixedPrecisionPolicy``); on CPU everything is fp32.
* **Teacher** (frozen, eval mode, no optimizer): every unit, the root included, reshards after
  each forward, so its parameters are gathered layer by layer in every forward (a generated
  token, a teacher-forced pass). On CUDA with bf16 its shards are stored in bf16 (half the
  memory of fp32 shards; no master copy is needed for a model that is never updated).
  ``--fsdp-offload-teacher`` keeps them in (pinned) CPU memory (``CPUOffloadPolicy``).
* **Hidden-state projection** (``--hidden-coef``): one unit, sharded like the student and
  updated by the same optimizer; its loss method is registered as an FSDP forward method so its
  parameters are gathered when the loss is computed.

Since every forward all-gathers, every process must call each model the same number of times:
the trainer's sampling loop runs in lockstep (generation.py's ``sync``), evaluation runs on
every process, and every process runs every micro-batch.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp import register_fsdp_forward_method

from .models import ModelError

# FSDP2 warns when a sharded model returns a view (transformers' hidden_states tuple holds some),
# since an in-place op on it would skip the pre-backward all-gather. The trainer never modifies
# model outputs in place (it indexes them with masks, which copies), so the warning says nothing.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")


def decoder_layers(model: torch.nn.Module, arg: str) -> list[torch.nn.Module]:
    """The model's decoder layers: its modules whose class is in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ModelError(
            f"{arg}: --fsdp shards a model per decoder layer, but {type(model).__name__} names no layer class "
            "(transformers' _no_split_modules is empty) or none of its modules is one"
        )
    return layers


def head_is_tied(model: torch.nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def _shard(model, mesh, arg: str, *, root_reshard: Optional[bool], layer_reshard: bool,
           mp: MixedPrecisionPolicy, offload: OffloadPolicy) -> torch.nn.Module:
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for layer in decoder_layers(model, arg):
        fully_shard(layer, reshard_after_forward=layer_reshard, **kw)
    if not head_is_tied(model):
        # Its own unit, so that its gathering can be controlled apart from the root's: the head
        # runs last in forward and first in backward, so a trained one stays gathered between.
        fully_shard(model.get_output_embeddings(), reshard_after_forward=root_reshard is True, **kw)
    # A tied head shares its weight with the embeddings: both stay in the root unit.
    fully_shard(model, reshard_after_forward=root_reshard, **kw)
    return model


def shard_student(model, mesh, bf16: bool) -> torch.nn.Module:
    """The student, sharded in place (see the module docstring); ``bf16``: bf16 compute, fp32
    reduction and master weights (CUDA)."""
    mp = MixedPrecisionPolicy()
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return _shard(model, mesh, "--student", root_reshard=None, layer_reshard=True, mp=mp, offload=OffloadPolicy())


def shard_teacher(model, mesh, bf16: bool, offload: bool) -> torch.nn.Module:
    """The frozen teacher, sharded in place; ``bf16``: its shards stored in bf16; ``offload``: on the CPU."""
    if bf16:
        model.to(torch.bfloat16)
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    return _shard(model, mesh, "--teacher", root_reshard=True, layer_reshard=True, mp=MixedPrecisionPolicy(),
                  offload=policy)


def shard_projection(projection: torch.nn.Module, mesh) -> torch.nn.Module:
    """The hidden-state projection as one unit, its parameters gathered in ``loss_sum``."""
    fully_shard(projection, mesh=mesh)
    register_fsdp_forward_method(projection, "loss_sum")
    return projection


def head_unit(model: torch.nn.Module) -> FSDPModule:
    """The FSDP unit that owns the LM head's weight: the head itself when untied, else the root.

    Hook for a fused LM-head loss (one that takes the hidden states and the head's weight
    rather than the logits): under FSDP the weight is a dim-0 shard (a DTensor) outside the
    unit's forward. Such a loss should call ``head_unit(model).unshard()`` once per micro-batch
    (not once per vocabulary or row chunk: each call is an all-gather of the whole head), use
    the unsharded ``model.get_output_embeddings().weight`` for every chunk, and let the unit's
    backward hooks reduce-scatter the head's gradient (or call ``reshard()`` under no_grad).
    """
    head = model.get_output_embeddings()
    return head if isinstance(head, FSDPModule) else model


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def _full(x):
    """A DTensor's full value (every process takes part); other values as they are."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """The global gradient norm over sharded parameters (the same number on every process),
    clipping to ``max_norm`` first when it is > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    return _full(norm)


def full_state_dict(module: torch.nn.Module) -> dict:
    """The module's whole state dict on the main process, on the CPU (every process takes part;
    the others get an empty dict). A tied parameter appears once, under its first name, as in
    what ``save_pretrained`` writes of an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = dict(module.named_parameters())
    aliases = [n for n, _ in module.named_parameters(remove_duplicate=False) if n not in first]
    for name in aliases:
        state.pop(name, None)
    return state
