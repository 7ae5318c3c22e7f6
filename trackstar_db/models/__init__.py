"""The model a database attributes: described once (source.ModelSource, plain data), opened in
one place (load.open_model), cut at one context rule (context.py), adapters resolved locally
(adapters.py). Only load.py imports torch and transformers, and only when it opens a model."""
