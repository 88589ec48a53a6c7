"""Benchmark: log-probabilities of given tokens (kdext.logprobs) vs log_softmax + gather.

    python bench/bench_logprobs.py --rows 1024 --vocab 32000 --csv bench/results/logprobs_cpu.csv
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_softmax  # noqa: E402

if __name__ == "__main__":
    bench_softmax.main(default_ops="logprobs", doc=__doc__)
