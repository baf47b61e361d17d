"""Test settings: one intra-op thread.

The tests use tiny float64 models, for which thread synchronisation costs more than it saves
(measured: the estimator tests run ~10x faster on one thread when the machine is busy), and
one thread makes results independent of the machine's core count.
"""

import torch

torch.set_num_threads(1)
