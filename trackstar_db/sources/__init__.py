"""Training texts and facts into the database: records, corpus, facts, the BM25 index."""
