"""Bounded label values: everything outside the allowed set becomes ``other``.

Validation happens once per distinct raw label tuple; the resulting attribute
dict is cached, so the recording hot path is one dict lookup. The cache itself
is bounded, so a flood of distinct bad values costs CPU, never memory.

Example::

    >>> from chatobs import catalogue
    >>> from chatobs.settings import load_settings
    >>> rejected = []
    >>> policy = LabelPolicy(load_settings({}).chatobs, on_reject=lambda m, l: rejected.append((m, l)))
    >>> policy.attributes(catalogue.get("somabrain_calls_total"), ("success",))
    {'result': 'success'}
    >>> policy.attributes(catalogue.get("somabrain_calls_total"), ("exploded",))
    {'result': 'other'}
    >>> rejected
    [('somabrain_calls_total', 'result')]
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

from chatobs.catalogue import OVERFLOW_VALUE, Label, Metric, allowed_fixed_values
from chatobs.settings import ChatobsSettings

__all__ = ["LabelPolicy"]

#: Most distinct raw label tuples remembered per metric. Past it, values are
#: still validated (and still bounded) but no longer cached.
CACHE_LIMIT: Final = 4096

RejectCallback = Callable[[str, str], None]


class _AllowedValues:
    """The allowed values of one label: a fixed set, or first-seen up to a limit."""

    __slots__ = ("_admitted", "_limit", "_lock", "open")

    def __init__(self, values: frozenset[str], limit: int):
        # An empty configured list means "admit the first `limit` distinct values".
        self.open = not values
        self._admitted: set[str] = set(values)
        self._limit = limit
        self._lock = threading.Lock()

    def admit(self, value: str) -> bool:
        if value in self._admitted:
            return True
        if not self.open:
            return False
        with self._lock:
            if value in self._admitted:
                return True
            if len(self._admitted) < self._limit:
                self._admitted.add(value)
                return True
        return False


class LabelPolicy:
    """Maps raw label values to bounded attribute dicts, per catalogue metric."""

    def __init__(self, settings: ChatobsSettings, on_reject: RejectCallback):
        self._settings = settings
        self._on_reject = on_reject
        # Labels that share a setting (e.g. `tenant` on six budget metrics) share one
        # admitted set, so the first-seen tenants are the same across metrics.
        self._by_setting: dict[str, _AllowedValues] = {}
        self._allowed: dict[tuple[str, str], _AllowedValues] = {}
        self._lock = threading.Lock()
        self._caches: dict[str, dict[tuple[str, ...], tuple[dict[str, str], tuple[str, ...]]]] = {}

    def _allowed_for(self, metric: Metric, label: Label) -> _AllowedValues:
        key = (metric.name, label.name)
        allowed = self._allowed.get(key)
        if allowed is not None:
            return allowed
        with self._lock:  # two threads must not build two admitted sets for one setting
            allowed = self._allowed.get(key)
            if allowed is not None:
                return allowed
            if label.bounded_by:
                # Bounded by its source (route templates, status codes); the cap is a safety net.
                allowed = _AllowedValues(frozenset(), self._settings.max_label_values)
            elif label.setting:
                allowed = self._by_setting.get(label.setting)
                if allowed is None:
                    configured = frozenset(getattr(self._settings, label.setting))
                    allowed = _AllowedValues(configured, self._settings.max_label_values)
                    self._by_setting[label.setting] = allowed
            else:
                allowed = _AllowedValues(allowed_fixed_values(metric, label), 0)
            self._allowed[key] = allowed
        return allowed

    def attributes(self, metric: Metric, values: tuple[str, ...]) -> dict[str, str]:
        """The attributes to record for ``values`` (in ``metric.labels`` order).

        Never raises for a bad value: it becomes ``other`` and the rejection is
        reported through ``on_reject``. The returned dict is shared: do not mutate.
        """
        cache = self._caches.get(metric.name)
        if cache is None:
            cache = self._caches.setdefault(metric.name, {})
        hit = cache.get(values)
        if hit is None:
            hit = self.resolve(metric, values)
            if len(cache) < CACHE_LIMIT:
                cache[values] = hit
        attributes, rejected = hit
        for label_name in rejected:
            self._on_reject(metric.name, label_name)
        return attributes

    def resolve(self, metric: Metric, values: tuple[str, ...]) -> tuple[dict[str, str], tuple[str, ...]]:
        """``(attributes, names of the labels whose value was rejected)``, without reporting."""
        if len(values) != len(metric.labels):
            raise TypeError(f"{metric.name} takes labels {metric.label_names}, got {len(values)} values")
        attributes: dict[str, str] = {}
        rejected: list[str] = []
        for label, raw in zip(metric.labels, values, strict=True):
            value = raw if isinstance(raw, str) else str(raw)
            if not self._allowed_for(metric, label).admit(value):
                value = OVERFLOW_VALUE
                rejected.append(label.name)
            attributes[label.name] = value
        return attributes, tuple(rejected)
