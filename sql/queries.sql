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
    INSERT INTO listener.results AS r
        (job_id, step, provider, output, model, duration_ms, input_tokens, output_tokens,
         calls, cost_usd)
    SELECT s.job_id, s.step, s.provider, s.output, s.model, s.duration_ms, s.input_tokens,
           s.output_tokens, s.calls, s.cost_usd
    FROM unnest($3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::text[], $8::float8[],
                $9::int[], $10::int[], $11::int[], $12::numeric[])
         AS s(job_id, step, provider, output, model, duration_ms, input_tokens, output_tokens,
              calls, cost_usd)
    WHERE s.job_id IN (SELECT id FROM done)
    ON CONFLICT (job_id, step) DO UPDATE
    SET provider = EXCLUDED.provider, output = EXCLUDED.output, model = EXCLUDED.model,
        duration_ms = EXCLUDED.duration_ms, input_tokens = EXCLUDED.input_tokens,
        output_tokens = EXCLUDED.output_tokens, calls = EXCLUDED.calls,
        cost_usd = EXCLUDED.cost_usd, created_at = now()
)
SELECT id FROM done;

-- name: save_step :one
-- Stores one step's result as soon as it is done, while the job is still leased to us
-- ($2 token), so a retry resumes after it and never pays for it twice. Returns false when
-- the lease was lost.
WITH held AS (
    SELECT id FROM listener.jobs
    WHERE id = $1 AND lease_token = $2 AND status = 'processing'
), saved AS (
    INSERT INTO listener.results
        (job_id, step, provider, output, model, duration_ms, input_tokens, output_tokens,
         calls, cost_usd)
    SELECT held.id, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11 FROM held
    ON CONFLICT (job_id, step) DO UPDATE
    SET provider = EXCLUDED.provider, output = EXCLUDED.output, model = EXCLUDED.model,
        duration_ms = EXCLUDED.duration_ms, input_tokens = EXCLUDED.input_tokens,
        output_tokens = EXCLUDED.output_tokens, calls = EXCLUDED.calls,
        cost_usd = EXCLUDED.cost_usd, created_at = now()
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM saved) AS saved;

-- name: job_outputs :many
-- The steps a job already has results for (a retry resumes after them).
SELECT step, output FROM listener.results WHERE job_id = $1;

-- name: spend_since :many
-- USD recorded since $1, per provider.
SELECT provider, sum(cost_usd)::float8 AS usd
FROM listener.results
WHERE created_at >= $1 AND cost_usd > 0
GROUP BY provider
ORDER BY provider;

-- name: ensure_provider_limit :execute
-- Creates a provider's shared limiter row on first use.
INSERT INTO listener.provider_limits (provider) VALUES ($1) ON CONFLICT DO NOTHING;

-- name: lock_provider_limit :one
-- A provider's limiter state, locked until the transaction ends, with the database clock
-- (epoch seconds): every daemon of the fleet reads the same clock.
SELECT request_tat, token_tat, paused_until, extract(epoch FROM clock_timestamp())::float8 AS now
FROM listener.provider_limits
WHERE provider = $1
FOR UPDATE;

-- name: save_provider_limit :execute
-- Stores a provider's limiter state; $5, when not NULL, is the reason of a new pause.
UPDATE listener.provider_limits
SET request_tat = $2, token_tat = $3, paused_until = $4,
    pause_reason = coalesce($5, pause_reason), updated_at = now()
WHERE provider = $1;

-- name: provider_pauses :many
-- Providers paused now, for how many more seconds, and why.
SELECT provider, paused_until - extract(epoch FROM clock_timestamp())::float8 AS remaining_s,
       pause_reason
FROM listener.provider_limits
WHERE paused_until > extract(epoch FROM clock_timestamp())
ORDER BY provider;

-- name: fail_jobs :many
-- Records failed attempts, fenced by lease token. A NULL delay ($3) is a dead letter: the job
-- is failed for good. Otherwise the job goes back to pending, runnable after the delay
-- (seconds) that the retry policy chose. $4 is the reason, kept in last_error. A deferred job
-- ($5 false: budget spent, provider paused) gets its attempt back.
UPDATE listener.jobs AS j
SET status = CASE WHEN f.delay_s IS NULL THEN 'failed' ELSE 'pending' END,
    run_after = CASE WHEN f.delay_s IS NULL THEN j.run_after
                     ELSE now() + make_interval(secs => f.delay_s) END,
    finished_at = CASE WHEN f.delay_s IS NULL THEN now() END,
    attempts = CASE WHEN f.counts THEN j.attempts ELSE greatest(j.attempts - 1, 0) END,
    last_error = f.error,
    lease_expires_at = NULL,
    lease_token = NULL,
    updated_at = now()
FROM unnest($1::bigint[], $2::uuid[], $3::float8[], $4::text[], $5::bool[])
     AS f(id, token, delay_s, error, counts)
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

-- name: insert_face :execute
-- Records a face Rekognition indexed (idempotent on its FaceId).
INSERT INTO listener.faces
    (face_id, collection_id, owner_id, job_id, source_table, source_id, bounding_box,
     confidence)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)
ON CONFLICT (face_id) DO NOTHING;

-- name: assign_face :one
-- Assigns a face to the person of the face it matched (see listener.assign_face).
SELECT listener.assign_face($1, $2, $3) AS person_id;

-- name: suggest_face :execute
-- Records a borderline match for a person to review.
INSERT INTO listener.face_suggestions (face_id, candidate_face_id, person_id, similarity)
SELECT $1, $2, f.person_id, $3 FROM listener.faces AS f WHERE f.face_id = $2
ON CONFLICT (face_id, candidate_face_id) DO NOTHING;

-- name: known_face_ids :many
-- Which of the given FaceIds listener has recorded (matches to others are ignored).
SELECT face_id FROM listener.faces WHERE face_id = ANY($1::text[]);

-- name: people_counts :one
-- People and faces recorded, and open suggestions.
SELECT (SELECT count(*) FROM listener.people) AS people,
       (SELECT count(*) FROM listener.faces) AS faces,
       (SELECT count(*) FROM listener.face_suggestions WHERE status = 'open') AS suggestions;
