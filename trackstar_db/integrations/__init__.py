"""Hooks into other tools' training loops (hf_trainer: a transformers TrainerCallback)."""
