"""Feature (hidden-state) distillation: a loss between chosen student and teacher layers.

``--hidden-coef C --hidden-loss mse|cosine --hidden-layers S1:T1,S2:T2`` adds ``C`` times

    mean over pairs (S, T) of  mean over the method's response tokens of  loss(W_S h_S + b_S, h_T)

to any method's loss, where ``h_S`` is the student's hidden state at layer S and ``h_T`` the
teacher's at layer T (transformers' ``hidden_states`` indices: 0 the embeddings, i the output
of block i) at the positions whose logits the method's main term uses (the data's response
tokens for data methods, the samples for SeqKD, on-policy GKD, DistiLLM's generated rows and
MiniLLM), and ``W_S`` a learned linear projection from the student's width to the teacher's
(one per pair, with bias). ``mse`` is the mean over the teacher's width of the squared error,
``cosine`` is ``1 - cos``. The teacher's states are constants; the gradient reaches the student
and the projection, which :class:`HiddenProjection` holds: a plain ``nn.Module``, trained with
the student by the same optimizer, kept in checkpoints, saved as
``OUT/hidden_projection.safetensors`` (beside ``OUT/final``, not in it: it is not part of the
student) with the layer pairs and the loss in its metadata.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .options import ConfigError
from .seeds import Stream, stream_seed

FILE_NAME = "hidden_projection.safetensors"


def parse_layer_pairs(text: str) -> list[tuple[int, int]]:
    """``"S1:T1,S2:T2"`` -> [(S1, T1), (S2, T2)]; ConfigError naming --hidden-layers otherwise."""
    pairs = []
    for part in text.split(","):
        bits = part.strip().split(":")
        try:
            if len(bits) != 2:
                raise ValueError
            s, t = int(bits[0]), int(bits[1])
        except ValueError:
            raise ConfigError(f"--hidden-layers must look like S1:T1,S2:T2 (layer indices); got {text!r}") from None
        if s < 0 or t < 0:
            raise ConfigError(f"--hidden-layers: layer indices must be >= 0; got {part.strip()!r}")
        pairs.append((s, t))
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"--hidden-layers: a pair is repeated in {text!r}")
    return pairs


def default_layer_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """Student block i -> teacher block round(i * teacher_blocks / student_blocks), i = 1 .. n."""
    return [(i, int(round(i * teacher_blocks / student_blocks))) for i in range(1, student_blocks + 1)]


def model_shape(model) -> tuple[int, int]:
    """(blocks, width) of a transformers causal LM from its config."""
    cfg = model.config
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


class HiddenProjection(torch.nn.Module):
    """One ``nn.Linear(student_width, teacher_width)`` per layer pair, and the loss."""

    def __init__(self, pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int, loss: str = "mse"):
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {loss!r}")
        self.pairs = [tuple(p) for p in pairs]
        self.loss = loss
        self.student_width, self.teacher_width = student_width, teacher_width
        self.proj = torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width) for _ in self.pairs)

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.pairs]

    def loss_sum(self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum over the rows of the per-row loss averaged over the pairs.

        ``student_states[i]`` / ``teacher_states[i]``: the [N, width] rows of layer i (all layers,
        as :func:`kdext.train.models.response_logits` returns them). Computed in float32 (the
        projection's dtype); the teacher's states carry no gradient.
        """
        total = None
        for (s, t), lin in zip(self.pairs, self.proj):
            x = lin(student_states[s].to(lin.weight.dtype))
            y = teacher_states[t].detach().to(x.dtype)
            if self.loss == "mse":
                per_row = (x - y).pow(2).mean(-1)
            else:
                per_row = 1.0 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-8)
            total = per_row.sum() if total is None else total + per_row.sum()
        return total / len(self.pairs)

    def metadata(self) -> dict[str, str]:
        return {
            "pairs": ",".join(f"{s}:{t}" for s, t in self.pairs),
            "loss": self.loss,
            "student_width": str(self.student_width),
            "teacher_width": str(self.teacher_width),
        }

    def to_bytes(self, state: Optional[dict] = None) -> bytes:
        """The projection as a safetensors file's bytes (what :meth:`save` writes); ``state``: its
        whole state dict when the module itself holds shards (--fsdp)."""
        from safetensors.torch import save

        state = self.state_dict() if state is None else state
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        return save(tensors, metadata=self.metadata())

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())


def load_projection(path: str) -> HiddenProjection:
    """A projection saved by :meth:`HiddenProjection.save`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    proj = HiddenProjection(parse_layer_pairs(meta["pairs"]), int(meta["student_width"]),
                            int(meta["teacher_width"]), meta["loss"])
    proj.load_state_dict(load_file(path))
    return proj


def build_projection(cfg, student, teacher, seed: int, device) -> Optional[HiddenProjection]:
    """The run's projection (None when --hidden-coef is 0), its layers checked against the models.

    Its initial weights come from their own random stream, so they do not depend on what else
    drew random numbers before.
    """
    if cfg.hidden_coef <= 0:
        return None
    s_blocks, s_width = model_shape(student)
    t_blocks, t_width = model_shape(teacher)
    pairs = parse_layer_pairs(cfg.hidden_layers) if cfg.hidden_layers else default_layer_pairs(s_blocks, t_blocks)
    for s, t in pairs:
        if s > s_blocks or t > t_blocks:
            raise ConfigError(
                f"--hidden-layers: pair {s}:{t} is out of range (the student has hidden states 0..{s_blocks}, "
                f"the teacher 0..{t_blocks})"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, Stream.HIDDEN_INIT))
        proj = HiddenProjection(pairs, s_width, t_width, cfg.hidden_loss)
    return proj.to(device)
