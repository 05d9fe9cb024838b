-- Runtime queries. Each block starts with `-- name: NAME :KIND` (KIND: one | many | execute)
-- and a comment saying what it does and why. listener/db/queries.py exposes one method each.

-- name: claim_jobs :many
-- Claims up to $1 runnable jobs for worker $2, leased for $3 seconds under token $4: pending
-- jobs whose run_after has passed, in priority then age order (an index scan of
-- jobs_claim_idx). SKIP LOCKED lets concurrent claimers pass over each other's rows instead of
-- queueing behind them; the UPDATE then touches exactly the rows this statement locked.
WITH next AS (
    SELECT id
    FROM listener.jobs
    WHERE status = 'pending' AND run_after <= now()
    ORDER BY priority, run_after, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE listener.jobs AS j
SET status = 'processing',
    attempts = j.attempts + 1,
    worker_id = $2,
    lease_token = $4,
    lease_expires_at = now() + make_interval(secs => $3),
    started_at = now(),
    updated_at = now()
FROM next
WHERE j.id = next.id
RETURNING j.id, j.source_table, j.source_id, j.image_url, j.owner_id, j.priority,
          j.attempts, j.max_attempts;

-- name: renew_leases :many
-- Heartbeat: extends by $3 seconds the leases this worker still holds (tokens $2) on jobs $1.
-- A job missing from the result was reclaimed by someone else after its lease expired.
UPDATE listener.jobs
SET lease_expires_at = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND lease_token = ANY($2::uuid[]) AND status = 'processing'
RETURNING id;

-- name: complete_jobs :many
-- Marks jobs complete and upserts their results in one statement, fenced by lease token so a
-- worker whose lease expired cannot overwrite a newer run. Upserting on (job_id, step) makes
-- a re-run after a crash replace, not duplicate, its results.
WITH done AS (
    UPDATE listener.jobs AS j
    SET status = 'complete', finished_at = now(), updated_at = now(), last_error = NULL,
        lease_expires_at = NULL, lease_token = NULL
    FROM unnest($1::bigint[], $2::uuid[]) AS d(id, token)
    WHERE j.id = d.id AND j.lease_token = d.token AND j.status = 'processing'
    RETURNING j.id
), saved AS (
    INSERT INTO listener.results AS r (job_id, step, provider, output, model, duration_ms)
    SELECT s.job_id, s.step, s.provider, s.output, s.model, s.duration_ms
    FROM unnest($3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::text[], $8::float8[])
         AS s(job_id, step, provider, output, model, duration_ms)
    WHERE s.job_id IN (SELECT id FROM done)
    ON CONFLICT (job_id, step) DO UPDATE
    SET provider = EXCLUDED.provider, output = EXCLUDED.output, model = EXCLUDED.model,
        duration_ms = EXCLUDED.duration_ms, created_at = now()
)
SELECT id FROM done;

-- name: fail_jobs :many
-- Records failed attempts, fenced by lease token. A NULL delay ($3) is a dead letter: the job
-- is failed for good. Otherwise the job goes back to pending, runnable after the delay
-- (seconds) that the retry policy chose. $4 is the reason, kept in last_error.
UPDATE listener.jobs AS j
SET status = CASE WHEN f.delay_s IS NULL THEN 'failed' ELSE 'pending' END,
    run_after = CASE WHEN f.delay_s IS NULL THEN j.run_after
                     ELSE now() + make_interval(secs => f.delay_s) END,
    finished_at = CASE WHEN f.delay_s IS NULL THEN now() END,
    last_error = f.error,
    lease_expires_at = NULL,
    lease_token = NULL,
    updated_at = now()
FROM unnest($1::bigint[], $2::uuid[], $3::float8[], $4::text[]) AS f(id, token, delay_s, error)
WHERE j.id = f.id AND j.lease_token = f.token AND j.status = 'processing'
RETURNING j.id, j.status;

-- name: release_jobs :many
-- Graceful shutdown: hands unfinished jobs back as pending, runnable at once. The attempt is
-- not counted: the job did not fail, its worker stopped.
UPDATE listener.jobs
SET status = 'pending', attempts = greatest(attempts - 1, 0), run_after = now(),
    lease_expires_at = NULL, lease_token = NULL, updated_at = now()
WHERE id = ANY($1::bigint[]) AND lease_token = ANY($2::uuid[]) AND status = 'processing'
RETURNING id;

-- name: reap_expired_leases :many
-- Jobs whose worker stopped renewing the lease (killed, frozen, cut off): back to pending, or
-- failed when their attempts are used up (a job that kills its worker must not loop forever).
-- SKIP LOCKED lets every daemon run this without waiting on each other.
WITH expired AS (
    SELECT id
    FROM listener.jobs
    WHERE status = 'processing' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
)
UPDATE listener.jobs AS j
SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'pending' END,
    finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
    last_error = format('lease expired: worker %s stopped renewing it (attempt %s of %s)',
                        j.worker_id, j.attempts, j.max_attempts),
    run_after = now(),
    lease_expires_at = NULL,
    lease_token = NULL,
    updated_at = now()
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.status;

-- name: queue_counts :one
-- Counts by status and the age (seconds) of the oldest pending job, in one scan.
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'processing') AS processing,
       count(*) FILTER (WHERE status = 'complete') AS complete,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')),
                0)::float8 AS oldest_pending_s
FROM listener.jobs;

-- name: attach :one
-- Installs the enqueue triggers on a table (see listener.attach in 0001_init.sql).
SELECT listener.attach($1, $2, $3, $4, $5) AS source_table;

-- name: detach :one
-- Removes the enqueue triggers from a table; false when it was not attached.
SELECT listener.detach($1) AS detached;

-- name: attachment :one
-- The attachment of one table; raises undefined_object when the table is not attached.
SELECT source_table, id_column, id_type, url_column, owner_column, status_column
FROM listener.attachment($1);

-- name: list_attachments :many
-- Every attached table.
SELECT source_table, id_column, id_type, url_column, owner_column, status_column, created_at
FROM listener.attachments
ORDER BY source_table;

-- name: count_unqueued :one
-- Rows of an attached table (optionally one owner's) that have no job yet.
SELECT listener.count_unqueued($1, $2) AS count;

-- name: backfill_chunk :one
-- Enqueues the next chunk of rows without a job (keyset pagination after $2).
SELECT last_id, scanned, enqueued FROM listener.backfill_chunk($1, $2, $3, $4, $5, $6);

-- name: table_progress :one
-- Progress of one table's jobs (optionally one owner's): still to do, and finished since $3.
SELECT count(*) FILTER (WHERE status IN ('pending', 'processing')) AS remaining,
       count(*) FILTER (WHERE status = 'complete' AND finished_at >= $3) AS complete,
       count(*) FILTER (WHERE status = 'failed' AND finished_at >= $3) AS failed
FROM listener.jobs
WHERE source_table = $1 AND ($2::text IS NULL OR owner_id = $2);

-- name: table_jobs :many
-- Every job of one table with its result for step $2, oldest first (the demo's report).
SELECT j.id, j.source_id, j.image_url, j.status, j.attempts, j.last_error, r.output,
       r.duration_ms
FROM listener.jobs AS j
LEFT JOIN listener.results AS r ON r.job_id = j.id AND r.step = $2
WHERE j.source_table = $1
ORDER BY j.id;
