"""Retrieval: exact streaming top-k (topk), the ablation ladder (methods), the embedding baseline."""

from .methods import LADDER, METHODS, MethodSpec, get_method, query_transform, train_transform, unit_normalize
from .topk import TopKResult, search, vector_batches

__all__ = ["LADDER", "METHODS", "MethodSpec", "TopKResult", "get_method", "query_transform", "search",
           "train_transform", "unit_normalize", "vector_batches"]
