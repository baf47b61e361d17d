"""Test settings: the study's one thread count (`influence.study.run_context.THREADS`).

Floating-point sums depend on the number of threads that split them (README, "Determinism"),
so the tests compute with the same intra-op thread count as every pipeline run and notebook.
The tests' tiny float64 models also run faster on one thread than on a busy machine's many
(measured ~10x for the estimator tests).
"""

import torch

from influence.study.run_context import THREADS

torch.set_num_threads(THREADS)
