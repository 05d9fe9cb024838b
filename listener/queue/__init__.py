"""The queue core: a fenced job store (Postgres and in-memory), the worker that claims and
runs jobs, notify, retry policies, pauses, side-loop runner. It knows nothing of what
its jobs analyze: side effects are opaque payloads the analysis side defines."""
