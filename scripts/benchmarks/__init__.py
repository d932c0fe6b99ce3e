"""supervise's benchmark, one module per area, in the order of the table README quotes.

- ``run``: the run's own costs (whole process, embedded spawn, deadline, exit latency,
  watching, memory overshoot, sampling);
- ``workspace``: the quota's overshoot and accounting, the Landlock jail's set-up;
- ``ledger``: the budget ledger on SQLite and Redis;
- ``rpc``: ``import supervisor.client`` and the budget RPC's round trips;
- ``audit``: the audit log's append, verify and summary, and ``supervise report``.

Run it as ``scripts/bench`` (see ``__main__`` for the options).
"""
