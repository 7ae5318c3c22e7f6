"""The warm models of one database handle: loaded once, shared by every verb that needs them.

Loading a checkpoint (and its optimizer state, and the second moment) costs far more than one
query, so the handle (`Database.models`) keeps what it loaded in one `ModelCache`, read by the
one-prompt query, token contributions, `verify`'s tail-patcher, the second stage (rerank) and
the server. An entry is keyed by `ModelKey`:

    model     a digest of the manifest's model record: the directory's fingerprint, its path,
              tokenizer and optimizer state (a new or re-attached model is a new key)
    settings  a digest of the featurizer settings and the task the stored vectors were made with
              (the manifest's 'featurizer' entry but what follows the model, and its 'task')
    variant   what was built: a gradient variant ('corrected', 'uncorrected'), 'plain' (no
              optimizer correction: the second stage's full gradients) or 'tail-patch'
    device    the resolved device ('cpu', 'cuda:0', ...)

so a changed manifest (a new model, other settings) is simply a miss, and the entries of another
model are dropped when one is loaded (one model's weights are held at a time). A server's next
snapshot takes its predecessor's cache with `adopt`: what its manifest still describes stays warm,
the rest is dropped. The cache holds values it does not look into (a Featurizer and tokenizer, a
TailPatcher); nothing heavy is imported here.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

FOLLOWS_MODEL = ("context_cap", "coverage")  # recorded per run from the model, not settings of it
FEATURIZER_VARIANTS = ("corrected", "uncorrected", "plain")  # entries holding (Featurizer, tokenizer)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelKey:
    """What one warm entry was built from (see the module docstring)."""

    model: str
    settings: str
    variant: str
    device: str

    @classmethod
    def of(cls, manifest: dict, variant: str, device: str) -> "ModelKey":
        """The key of `variant` on `device` for the model and settings `manifest` records."""
        model, settings = state(manifest)
        return cls(model, settings, variant, str(device))

    @property
    def state(self) -> tuple[str, str]:
        return self.model, self.settings


def state(manifest: dict) -> tuple[str, str]:
    """(model digest, settings digest) of a manifest: the part of a key every variant shares."""
    featurizer = {k: v for k, v in (manifest.get("featurizer") or {}).items() if k not in FOLLOWS_MODEL}
    return _digest(manifest.get("model")), _digest({"featurizer": featurizer, "task": manifest.get("task")})


class ModelCache:
    """Warm values by ModelKey; `loads` counts the loads it made (a test's and a health check's view)."""

    def __init__(self):
        self._entries: dict[ModelKey, object] = {}
        self._lock = threading.RLock()  # a server's worker and its ASGI threads share one snapshot's cache
        self.loads = 0

    def get(self, key: ModelKey, load: Callable[[], object]):
        """The value kept under `key`, or `load()`'s, kept; loading drops the entries of any other
        model or settings first, so their weights are freed before the new ones arrive."""
        with self._lock:
            if key in self._entries:
                return self._entries[key]
            for other in [k for k in self._entries if k.state != key.state]:
                del self._entries[other]
            value = load()
            self._entries[key] = value
            self.loads += 1
            return value

    def find(self, manifest: dict, device: str, variants: Iterable[str] = FEATURIZER_VARIANTS):
        """A warm value of one of `variants` for `manifest`'s model and settings on `device`, or None
        (the second stage reuses whichever featurizer a query loaded)."""
        wanted = [ModelKey.of(manifest, variant, device) for variant in variants]
        with self._lock:
            return next((self._entries[key] for key in wanted if key in self._entries), None)

    def adopt(self, previous: "ModelCache", manifest: dict) -> int:
        """Take `previous`'s entries that `manifest` still describes (same model and settings);
        the rest stay behind. Returns how many were taken."""
        if previous is self:
            return 0
        current = state(manifest)
        with previous._lock:
            kept = {key: value for key, value in previous._entries.items() if key.state == current}
        with self._lock:
            self._entries.update(kept)
        return len(kept)

    def keys(self) -> list[ModelKey]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry (their memory is freed once no caller holds them)."""
        with self._lock:
            self._entries.clear()
