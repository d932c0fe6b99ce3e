"""Budgets for LLM calls: an exact, atomic ledger over every scope, and its prices.

``Ledger`` (``supervisor.budget.ledger``) holds, charges and reports; it speaks to a store
through the typed ``Store`` protocol of ``_store.py``. The stores are ``sqlite.py`` (the
default, one file under ``$XDG_STATE_HOME/supervise/``; its tables in ``_sqlite_sql.py``,
its rate window in ``_sqlite_rate.py``) and ``redis.py`` with the scripts of ``ledger.lua``
(budgets shared across machines); ``pricing.py`` prices a call from the policy's overrides
or the maintained genai-prices table. Nothing is imported here: a run without a budget
never pays for sqlite3, redis or the price table.
"""
