"""Budgets for LLM calls: an exact, atomic ledger over every scope, and its prices.

``Ledger`` (``supervisor.budget.ledger``) holds, charges and reports; the stores are
``sqlite.py`` (the default, one file under ``$XDG_STATE_HOME/supervise/``) and ``redis.py``
(budgets shared across machines); ``pricing.py`` prices a call from the policy's overrides
or the maintained genai-prices table. Nothing is imported here: a run without a budget
never pays for sqlite3, redis or the price table.
"""
