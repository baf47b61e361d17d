"""A gradient index: pass over a training corpus once, store each example's (compressed)
gradient in memory-mapped shards, and answer new queries without reading the corpus again.

    index = GradientIndex.build(model, task, ekfac, train, "corpus.index",
                                compression=EigenCompression(k_s=16, k_a=16))
    index = GradientIndex.open("corpus.index")          # any later process
    scores = index.scores(model, task, queries)          # [Q, N]
    table = index.top_k(model, task, queries, k=10)      # like top_influences
"""

from .compression import EigenCompression, RandomCompression
from .gradient_index import GradientIndex

__all__ = ["EigenCompression", "GradientIndex", "RandomCompression"]
