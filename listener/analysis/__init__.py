"""The analysis side: turns a claimed job into an outcome (dispatch, pipeline, fetch,
probe, hashes, dedup, costs, budget, rate limits, the Batch API, faces, providers)."""
