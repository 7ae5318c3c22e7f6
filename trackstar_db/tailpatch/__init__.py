"""Influence by tail-patching: one optimizer step on a proponent, the change in P(target)."""
