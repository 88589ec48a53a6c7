"""kdext: fused, exact kernels for knowledge distillation of language models."""
