"""The queue core: a fenced job store (Postgres and in-memory), the worker that claims and
runs jobs, notify, retry policies, pauses, side-loop runner. It knows nothing of images."""
