"""What a training step keeps for backward: runs SCRIPT as __main__ and, at each of its first 3 backward passes,
prints to stderr the MiB of distinct storages saved for backward since the previous one, and the largest by shape
(docs/benchmark.md, PPO's 285 MiB). Works on TRL's side too (benchmark/trl_side.py as SCRIPT).

    python benchmark/saved_tensors.py ppo.py --model-name ... 2>&1 | grep -A5 SAVED
"""

import collections
import os
import runpy
import sys

import torch

saved = {}  # storage address -> (bytes, shape, dtype) since the last backward
backward, calls = torch.Tensor.backward, [0]


def pack(t):
    saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype)
    return t


def counted_backward(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] <= 3:
        by_shape = collections.Counter()
        for n, shape, dtype in saved.values():
            by_shape[shape, dtype] += n
        print(f"SAVED {sum(by_shape.values()) / 2**20:.1f} MiB in {len(saved)} storages", file=sys.stderr)
        for (shape, dtype), n in by_shape.most_common(5):
            print(f"    {shape} {dtype}: {n / 2**20:.1f} MiB", file=sys.stderr)
    saved.clear()
    return backward(self, *args, **kwargs)


if __name__ == "__main__":
    torch.Tensor.backward = counted_backward
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        runpy.run_path(sys.argv[0], run_name="__main__")
