"""Forward-only runs hold one layer at a time: peak memory does not grow with depth."""

import subprocess
import sys

PEAK_RSS = """
import resource, sys
import torch
torch.set_num_threads(1)
from precision_suite.engine import run_cases
from precision_suite.spec import Case
depth = int(sys.argv[1])
cases = [Case(init="kaiming_normal", activation=a, format="fp16", width=128, depth=depth, batch=256)
         for a in ("relu", "tanh")]
[r.status for r in run_cases(cases, backward=False)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kib(depth: int) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(depth)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_forward_peak_memory_is_flat_in_depth():
    shallow, deep = peak_kib(200), peak_kib(2000)
    # one layer's tensors here: 256 x 128 x 4 B = 128 KiB each; holding every layer's pre and post
    # would add ~1 GiB at depth 2000
    assert deep <= 1.10 * shallow, f"peak RSS {deep} KiB at depth 2000 vs {shallow} KiB at depth 200"
