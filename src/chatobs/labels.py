"""Bounded label values: everything outside the allowed set becomes ``other``.

Validation happens once per distinct raw label tuple; the resulting attribute
dict is cached, so the recording hot path is one dict lookup. The cache itself
is bounded, so a flood of distinct bad values costs CPU, never memory.

A value is rejected (recorded as ``other``, reported through ``on_reject``) when it
is outside the label's allowed set, and also, whatever the set, when it is not a
string or an integer (``None``, bytes, floats, objects), longer than
``CHATOBS_MAX_LABEL_LENGTH``, not encodable as UTF-8 (a lone surrogate would be
rendered as ``?``, and two such values would collide into one series), or ``other``
itself where the label does not declare it (it would otherwise take a first-seen slot and
merge with the overflow unseen). A label whose fixed values include ``other`` (the code of
an unclassified LLM failure) records it as its own value, with no rejection.

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

__all__ = ["LabelPolicy", "cacheable", "label_bound", "label_text", "series_bound"]

#: Most distinct raw label tuples remembered per metric. Past it, values are
#: still validated (and still bounded) but no longer cached.
CACHE_LIMIT: Final = 4096

#: Marks a raw value that is no label value at all (see :func:`label_text`).
_INVALID: Final = object()


def label_text(raw: object, max_length: int) -> str | object:
    """``raw`` as a label value, or ``_INVALID`` (never raises).

    Strings are used as they are (a ``str`` subclass, such as an enum, by its string
    content, since ``str()`` of a ``(str, Enum)`` member is its qualified name); integers
    (not bools) by their decimal text; nothing else is a label value.
    """
    # type(), not `__class__` (the hot paths' idiom): what passes is stored and rendered at every
    # scrape, and an object can claim any `__class__` (a `Mock(spec=str)` does).
    if type(raw) is str:
        value = raw
    elif issubclass(type(raw), str):
        value = str.__str__(raw)
    elif type(raw) is int and raw.bit_length() <= 3 * max_length:
        # 3 bits per digit bounds the text at max_length digits: str() of a huge int is slow (or raises).
        value = str(raw)
    else:
        return _INVALID
    if len(value) > max_length:
        return _INVALID
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return _INVALID
    return value


def cacheable(values: tuple[object, ...]) -> bool:
    """Whether a raw label tuple may key a cache: only exact strings. Python's equality would
    let ``True``, ``1`` and ``1.0`` share an entry, and an unhashable value cannot key one."""
    return all(type(value) is str for value in values)


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
        # Full is final (the set only grows): a flood of new values is turned away without the lock.
        # `other` is admitted only where the catalogue declares it: first seen, it would merge
        # with the overflow and hide that values were turned away.
        if not self.open or len(self._admitted) >= self._limit or value == OVERFLOW_VALUE:
            return False
        with self._lock:
            if value in self._admitted:
                return True
            if len(self._admitted) < self._limit:
                self._admitted.add(value)
                return True
        return False


def label_bound(metric: Metric, label: Label, settings: ChatobsSettings) -> int:
    """Most distinct values :class:`LabelPolicy` can record for ``label`` of ``metric``, ``other`` included."""
    if label.values:
        return len(allowed_fixed_values(metric, label) | {OVERFLOW_VALUE})
    configured = getattr(settings, label.setting) if label.setting else ()
    # A configured list is closed; an empty one (and a `bounded_by` label) admits the first N.
    return (len(configured) if configured else settings.max_label_values) + 1


def series_bound(metric: Metric, settings: ChatobsSettings) -> int:
    """Most series :class:`LabelPolicy` lets ``metric`` have: the product of its labels' bounds.

    >>> from chatobs import catalogue
    >>> from chatobs.settings import load_settings
    >>> series_bound(catalogue.get("llm_requests_total"), load_settings({}).chatobs)  # 51 x 51 x 3
    7803
    """
    bound = 1
    for label in metric.labels:
        bound *= label_bound(metric, label, settings)
    return bound


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

    def renew_locks(self) -> None:
        """In a forked child: new locks. Another thread of the parent may have held one at the
        fork, and the child has no such thread to release it: its first new label value would
        wait for ever."""
        self._lock = threading.Lock()
        for allowed in self._allowed.values():  # every shared (`_by_setting`) one is here too
            allowed._lock = threading.Lock()

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
        try:
            hit = cache.get(values)
        except Exception:  # noqa: BLE001 - an unhashable value: resolved (to `other`) below, never cached
            hit = None
        if hit is None:
            hit = self.resolve(metric, values)
            if len(cache) < CACHE_LIMIT and cacheable(values):
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
        max_length = self._settings.max_label_length
        for label, raw in zip(metric.labels, values, strict=True):
            value = label_text(raw, max_length)
            if value is _INVALID or not self._allowed_for(metric, label).admit(value):  # type: ignore[arg-type]
                value = OVERFLOW_VALUE
                rejected.append(label.name)
            attributes[label.name] = value  # type: ignore[assignment]
        return attributes, tuple(rejected)
