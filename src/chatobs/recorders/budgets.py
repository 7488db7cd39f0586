"""Per-tenant token and message budgets."""

from __future__ import annotations

from chatobs.recorders._base import Recorder, checked_amount, guarded

__all__ = ["BudgetRecorder"]


class BudgetRecorder(Recorder):
    """Recording helpers for tenant budgets (``tenant`` is bounded: see ``CHATOBS_TENANTS``).

    Example::

        budgets = telemetry.budgets
        budgets.tokens("acme", allowed=100_000, used=41_200)
        budgets.token_overrun("acme")
    """

    # Both numbers are checked before either is recorded: one call, all or nothing.
    @guarded("tenant_budget_tokens_used")
    def tokens(self, tenant: str, *, allowed: int, used: int) -> None:
        allowed, used = checked_amount(allowed), checked_amount(used)
        self._set("tenant_budget_tokens_allowed", allowed, tenant)
        self._set("tenant_budget_tokens_used", used, tenant)
        # The overrun series exists (at 0) before the tenant's first overrun: Prometheus's
        # increase() of a series that first appears at 1 is 0, and that overrun would not alert.
        self._add("tenant_budget_tokens_overruns_total", 0, tenant)

    @guarded("tenant_budget_messages_used")
    def messages(self, tenant: str, *, allowed: int, used: int) -> None:
        allowed, used = checked_amount(allowed), checked_amount(used)
        self._set("tenant_budget_messages_allowed", allowed, tenant)
        self._set("tenant_budget_messages_used", used, tenant)
        self._add("tenant_budget_messages_overruns_total", 0, tenant)

    @guarded("tenant_budget_tokens_overruns_total")
    def token_overrun(self, tenant: str) -> None:
        self._add("tenant_budget_tokens_overruns_total", 1, tenant)

    @guarded("tenant_budget_messages_overruns_total")
    def message_overrun(self, tenant: str) -> None:
        self._add("tenant_budget_messages_overruns_total", 1, tenant)
