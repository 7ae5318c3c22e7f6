"""Retrieval: the ablation ladder as data (methods), exact streaming top-k (topk), the one
scoring path (scoring), stored runs (runs), one-prompt queries (adhoc), the embedding baseline."""
