"""Featurizer settings resolved in one place, for the library and the CLI alike.

`resolve(stored, given, optimizer)`: the stored settings of a database win unless a given one
overrides them (a changed setting is then refused by the worker, never mixed); on a first run
the given ones fill the defaults. The default correction is what the checkpoint supports: the
optimizer's own second moments when its state is there (Adam -> 'adam-factored', Adafactor ->
'adafactor'), else the estimate from a sample of training examples ('estimated').
"""

from __future__ import annotations

from .config import FeaturizerConfig

AUTO = "auto"


def default_correction(optimizer: str | None) -> str:
    """optimizer: the recorded optimizer name ('adam', 'adamw', 'adafactor') or None."""
    if optimizer is None:
        return "estimated"
    return "adafactor" if optimizer == "adafactor" else "adam-factored"


def resolve(stored: FeaturizerConfig | None, given: dict | None = None,
            optimizer: str | None = None) -> FeaturizerConfig:
    """The settings a gradient run uses. `given` may hold None for 'not given'."""
    given = {key: value for key, value in (given or {}).items() if value is not None}
    base = stored.to_dict() if stored is not None else {}
    merged = {**base, **given}
    if merged.get("correction", AUTO) == AUTO:
        merged["correction"] = base.get("correction") or default_correction(optimizer)
    return FeaturizerConfig.from_dict(merged)
