"""The CPU output pool (csrc/cpu/buffer_pool.h): freed large outputs are reused, never shared."""

import os
import subprocess
import sys

import torch

import kdext


def test_a_freed_output_block_is_reused_and_values_stay_right():
    x = torch.randn(64, 8192)
    a = kdext.softmax(x)
    ptr = a.data_ptr()
    del a
    b = kdext.softmax(x * 2)
    assert b.data_ptr() == ptr  # the same pages, already mapped
    torch.testing.assert_close(b, torch.softmax(x * 2, -1))
    c = kdext.softmax(x)  # b is alive: c must get other memory
    assert c.data_ptr() != b.data_ptr()
    torch.testing.assert_close(c, torch.softmax(x, -1))


def test_gradient_buffers_outlive_the_op_safely():
    s = torch.randn(32, 4096, requires_grad=True)
    t = torch.randn(32, 4096)
    grads = []
    for _ in range(3):
        s.grad = None
        kdext.distill_loss(s, t).backward()
        grads.append(s.grad)
    for g in grads[1:]:
        assert g.data_ptr() != grads[0].data_ptr()
        torch.testing.assert_close(g, grads[0])


def test_pool_can_be_disabled():
    code = (
        "import torch, kdext; x = torch.randn(64, 8192); a = kdext.softmax(x); p = a.data_ptr(); del a; "
        "b = kdext.softmax(x); torch.testing.assert_close(b, torch.softmax(x, -1)); print('ok')"
    )
    env = dict(os.environ, KDEXT_CPU_POOL_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("ok")
