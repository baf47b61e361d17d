"""influence: exact, fast influence functions for PyTorch models made of linear layers.

Fit a curvature estimator once, then score queries against training data::

    task = influence.LanguageModelingTask()
    est = influence.EKFAC().fit(model, task, train_data)
    scores = influence.pairwise_scores(model, task, est, query_data, train_data)  # [Q, N]
"""

from .diagonal import Diagonal
from .ekfac import EKFAC
from .estimator import Estimator
from .gradients import per_example_gradients
from .identity import Identity
from .io import load_scores, save_scores
from .kfac import KFAC
from .layers import LayerInfo, find_layers
from .scores import pairwise_scores, preconditioned_queries, self_scores
from .tasks import ClassificationTask, LanguageModelingTask, RegressionTask, Task

__all__ = [
    "EKFAC",
    "KFAC",
    "ClassificationTask",
    "Diagonal",
    "Estimator",
    "Identity",
    "LanguageModelingTask",
    "LayerInfo",
    "RegressionTask",
    "Task",
    "find_layers",
    "load_scores",
    "pairwise_scores",
    "per_example_gradients",
    "preconditioned_queries",
    "save_scores",
    "self_scores",
]

__version__ = "0.1.0"
