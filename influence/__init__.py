"""influence: exact, fast influence functions for PyTorch models made of linear layers.

Fit a curvature estimator once, then score queries against training data::

    task = influence.LanguageModelingTask()
    est = influence.EKFAC().fit(model, task, train_data)
    scores = influence.pairwise_scores(model, task, est, query_data, train_data)  # [Q, N]
"""

from .cg import CG
from .diagonal import Diagonal
from .ekfac import EKFAC
from .estimator import Estimator
from .filtering import bm25_candidates, bm25_scores, candidate_recall, shares_content_tokens
from .gnvp import GaussNewton
from .gradients import per_example_gradients
from .identity import Identity
from .index import EigenCompression, GradientIndex, RandomCompression
from .io import load_scores, save_scores
from .kfac import KFAC
from .layers import LayerInfo, find_layers
from .lds import draw_subsets, lds, retrain_measurements
from .lissa import LiSSA
from .memory import MemoryPlan, memory_plan
from .pbrf import pbrf_scores
from .scores import pairwise_scores, preconditioned_queries, self_scores
from .tables import prompt_completion_queries, top_influences
from .tasks import (
    ClassificationTask,
    LanguageModelingTask,
    RegressionTask,
    Seq2SeqLMTask,
    SequenceClassificationTask,
    Task,
)
from .token_html import render_token_html

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "EigenCompression",
    "GradientIndex",
    "ClassificationTask",
    "Diagonal",
    "Estimator",
    "GaussNewton",
    "Identity",
    "LanguageModelingTask",
    "LayerInfo",
    "LiSSA",
    "MemoryPlan",
    "RandomCompression",
    "RegressionTask",
    "Seq2SeqLMTask",
    "SequenceClassificationTask",
    "Task",
    "bm25_candidates",
    "bm25_scores",
    "candidate_recall",
    "draw_subsets",
    "find_layers",
    "lds",
    "memory_plan",
    "load_scores",
    "pairwise_scores",
    "pbrf_scores",
    "per_example_gradients",
    "preconditioned_queries",
    "prompt_completion_queries",
    "render_token_html",
    "retrain_measurements",
    "save_scores",
    "self_scores",
    "shares_content_tokens",
    "top_influences",
]

__version__ = "0.1.0"
