-- Runtime queries. Each block starts with `-- name: NAME :KIND` (KIND: one | many | execute)
-- and a comment saying what it does and why. listener/db/queries.py exposes one method each.
--
-- What runs inside PostgreSQL is in sql/schema.sql, the current schema in one file: the claim
-- and the admission (listener.claim_jobs, listener.admit_entries, and the admit_<oid> that
-- attach_table generates per table; section 3 there), the triggers that every job change
-- sets off, and the side loops' functions. Many blocks below are one-line calls of those
-- functions; the numbers in comments (0019, ...) name the migration that introduced a piece.

-- name: claim_jobs :many
-- Claims up to $1 runnable jobs for worker $2, leased for $3 seconds under token $4, in one
-- transaction (listener.claim_jobs in sql/schema.sql, which holds the statement between its
-- "claim: begin" and "claim: end" markers): pending jobs whose run_after has passed, in
-- priority then age order (an index scan of jobs_claim_idx), and, with $6 > 0, up to $6 rows
-- the app inserted, admitted as jobs claimed at once in the room the pending jobs of
-- priority 0 or less left, before those of higher numbers. SKIP LOCKED lets concurrent
-- claimers pass over each other's rows instead of queueing behind them; the UPDATE then touches exactly the rows
-- this statement locked. A job without max_attempts (enqueued by a trigger) takes the
-- daemon's default $5. done_steps, the steps already stored, is what a run resumes after:
-- only a job claimed before can have any (results are written under a claim, or by a batch
-- the job was parked for after a claim), so a first claim skips the look-up. The UPDATE finds
-- its rows by id through an array (jobs_pkey): joined to the CTE instead, a generic plan,
-- which cannot see the size of $1, may hash-join against a scan of every job (PostgreSQL 18
-- does). The claimed jobs come back in claim order (run_after is not changed by the claim).
SELECT id, source_table, source_id, image_url, owner_id, priority, attempts, max_attempts,
       batch_mode, claims, done_steps
FROM listener.claim_jobs($1, $2, $3, $4, $5, $6);

-- name: admit_inserted_rows :one
-- Admits up to $1 rows the app inserted into attached tables (0019) outside a claim: their
-- jobs are made from the rows' current values. Returns the rows taken; NOTIFY when more jobs
-- were made than $2 (other daemons claim them) or $1 rows were taken (more may wait).
SELECT listener.admit_inserted_rows($1, $2) AS admitted;

-- name: renew_leases :many
-- Heartbeat: extends by $3 seconds the leases this worker still holds (tokens $2) on jobs $1.
-- A job missing from the result was reclaimed by someone else after its lease expired.
UPDATE listener.jobs
SET lease_expires_at = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND lease_token = ANY($2::uuid[]) AND status = 'processing'
RETURNING id;

-- name: complete_jobs :many
-- Marks jobs complete and stores their unsaved results in one statement, fenced by lease
-- token so a worker whose lease expired cannot overwrite a newer run.
WITH done AS (
    UPDATE listener.jobs AS j
    SET status = 'complete', finished_at = now(), updated_at = now(), last_error = NULL,
        lease_expires_at = NULL, lease_token = NULL
    FROM unnest($1::bigint[], $2::uuid[]) AS d(id, token)
    -- id = ANY keeps even a generic (cached) plan on the primary key: joined to unnest
    -- alone, it can scan every processing job for every row of the batch.
    WHERE j.id = ANY($1::bigint[]) AND j.id = d.id AND j.lease_token = d.token
      AND j.status = 'processing'
    RETURNING j.id
), saved AS (
    INSERT INTO listener.results AS r
        (job_id, step, provider, output, model, duration_ms, input_tokens, output_tokens,
         calls, cost_usd, image_sha256, image_phash)
    SELECT s.job_id, s.step, s.provider, s.output, s.model, s.duration_ms, s.input_tokens,
           s.output_tokens, s.calls, s.cost_usd, s.image_sha256, s.image_phash
    FROM unnest($3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::text[], $8::float8[],
                $9::int[], $10::int[], $11::int[], $12::numeric[], $13::bytea[], $14::bigint[])
         AS s(job_id, step, provider, output, model, duration_ms, input_tokens, output_tokens,
              calls, cost_usd, image_sha256, image_phash)
    WHERE s.job_id IN (SELECT id FROM done)
    ON CONFLICT (job_id, step) DO UPDATE
    -- Stored twice only when a run was killed between the provider's answer and this write:
    -- the newer output wins and the costs add up, so spend counts what was paid.
    SET provider = EXCLUDED.provider, output = EXCLUDED.output, model = EXCLUDED.model,
        duration_ms = EXCLUDED.duration_ms,
        input_tokens = coalesce(r.input_tokens, 0) + coalesce(EXCLUDED.input_tokens, 0),
        output_tokens = coalesce(r.output_tokens, 0) + coalesce(EXCLUDED.output_tokens, 0),
        calls = r.calls + EXCLUDED.calls, cost_usd = r.cost_usd + EXCLUDED.cost_usd,
        image_sha256 = EXCLUDED.image_sha256, image_phash = EXCLUDED.image_phash,
        reused_from = NULL, reuse_kind = NULL, saved_usd = NULL,
        created_at = now()
)
SELECT id FROM done;

-- name: save_step :one
-- Stores one step's result as soon as it is done, while the job is still leased to us
-- ($2 token), so the next run resumes after it and never pays for it twice. Returns false
-- when the lease was lost (nothing is written then). $12/$13: the image's SHA-256 and
-- perceptual hash (for deduplication); $14-$16: set on a copy of job $14's result (kind $15,
-- $16 USD not paid), which also appends a savings delta (0016_dedup.sql).
WITH held AS (
    SELECT id FROM listener.jobs
    WHERE id = $1 AND lease_token = $2 AND status = 'processing'
), saved AS (
    INSERT INTO listener.results AS r
        (job_id, step, provider, output, model, duration_ms, input_tokens, output_tokens,
         calls, cost_usd, image_sha256, image_phash, reused_from, reuse_kind, saved_usd)
    SELECT held.id, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12::bytea, $13::bigint,
           $14::bigint, $15::text, $16::numeric
    FROM held
    ON CONFLICT (job_id, step) DO UPDATE
    -- Stored twice only when a run was killed between the provider's answer and this write:
    -- the newer output wins and the costs add up, so spend counts what was paid.
    SET provider = EXCLUDED.provider, output = EXCLUDED.output, model = EXCLUDED.model,
        duration_ms = EXCLUDED.duration_ms,
        input_tokens = coalesce(r.input_tokens, 0) + coalesce(EXCLUDED.input_tokens, 0),
        output_tokens = coalesce(r.output_tokens, 0) + coalesce(EXCLUDED.output_tokens, 0),
        calls = r.calls + EXCLUDED.calls, cost_usd = r.cost_usd + EXCLUDED.cost_usd,
        image_sha256 = EXCLUDED.image_sha256, image_phash = EXCLUDED.image_phash,
        reused_from = EXCLUDED.reused_from, reuse_kind = EXCLUDED.reuse_kind,
        saved_usd = EXCLUDED.saved_usd, created_at = now()
    RETURNING 1
), counted AS (
    INSERT INTO listener.dedup_deltas (provider, day, steps, usd)
    SELECT $4, (now() AT TIME ZONE 'UTC')::date, 1, $16::numeric
    FROM saved
    WHERE $15::text IS NOT NULL
)
SELECT EXISTS (SELECT 1 FROM saved) AS saved;

-- name: find_same_image :one
-- A stored result of step $1 for the same image bytes (SHA-256 $2) from another job than $3,
-- in scope $4 ('owner': table $5 and owner $6, NULL owners alike; 'table': table $5;
-- 'global'): read through results_sha256_idx, at most $7 candidates, then the scope's filter
-- on each candidate's job by primary key. A copy names its origin and what the origin paid.
SELECT c.provider, c.output, c.model,
       coalesce(c.reused_from, c.job_id) AS origin_job_id,
       (CASE WHEN c.reused_from IS NULL THEN c.cost_usd ELSE c.saved_usd END)::float8
           AS saved_usd
FROM (
    SELECT r.job_id, r.provider, r.output, r.model, r.reused_from, r.cost_usd, r.saved_usd
    FROM listener.results AS r
    WHERE r.image_sha256 = $2 AND r.step = $1 AND r.job_id <> $3
    LIMIT $7
) AS c
JOIN listener.jobs AS j ON j.id = c.job_id
WHERE $4 = 'global'
   OR (j.source_table = $5
       AND ($4 = 'table' OR j.owner_id IS NOT DISTINCT FROM $6::text))
LIMIT 1;

-- name: find_similar_image :one
-- Near duplicate: a stored result of step $1 whose image's perceptual hash is within $3 bits
-- of $2 (the nearest), from another job than $4, in scope $5 (as find_same_image: table $6,
-- owner $7). Candidates share one 16-bit quarter of the hash with $2 (the four
-- results_phash_q*_idx, which find every hash within 3 bits), at most $8 of them.
SELECT c.provider, c.output, c.model,
       coalesce(c.reused_from, c.job_id) AS origin_job_id,
       (CASE WHEN c.reused_from IS NULL THEN c.cost_usd ELSE c.saved_usd END)::float8
           AS saved_usd,
       c.distance
FROM (
    SELECT r.job_id, r.provider, r.output, r.model, r.reused_from, r.cost_usd, r.saved_usd,
           bit_count((r.image_phash # $2::bigint)::bit(64))::int AS distance
    FROM listener.results AS r
    WHERE r.step = $1 AND r.image_phash IS NOT NULL AND r.job_id <> $4
      AND (((r.image_phash >> 48) & 65535) = (($2::bigint >> 48) & 65535)
           OR ((r.image_phash >> 32) & 65535) = (($2::bigint >> 32) & 65535)
           OR ((r.image_phash >> 16) & 65535) = (($2::bigint >> 16) & 65535)
           OR (r.image_phash & 65535) = ($2::bigint & 65535))
    LIMIT $8
) AS c
JOIN listener.jobs AS j ON j.id = c.job_id
WHERE c.distance <= $3
  AND ($5 = 'global'
       OR (j.source_table = $6
           AND ($5 = 'table' OR j.owner_id IS NOT DISTINCT FROM $7::text)))
ORDER BY c.distance
LIMIT 1;

-- name: lock_leased_job :one
-- Locks job $1 while it is leased to us ($2 token), for a step stored with its effects in one
-- transaction (no row: the lease was lost, write nothing). FOR UPDATE holds off a reaper, a
-- cancel or a new claim until the step and its effects are committed.
SELECT id, source_table, source_id, owner_id
FROM listener.jobs
WHERE id = $1 AND lease_token = $2 AND status = 'processing'
FOR UPDATE;

-- name: apply_face_effects :one
-- Records the "faces" effect ($5) of job $1 (source table $2, row $3, owner $4): faces,
-- people, suggestions (see listener.apply_face_effects); {face_id: person_id}.
SELECT listener.apply_face_effects($1, $2, $3, $4, $5::jsonb) AS people;

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

-- name: spend_totals :many
-- USD per provider on UTC days from $1 on, and in all, from the spend counters (0008: folded
-- per day plus the deltas not folded yet): O(providers x days), not O(results).
SELECT provider,
       coalesce(sum(usd) FILTER (WHERE day >= $1), 0)::float8 AS since,
       sum(usd)::float8 AS total
FROM (SELECT provider, day, usd FROM listener.spend_by_day
      UNION ALL
      SELECT provider, day, usd FROM listener.spend_deltas) AS s
GROUP BY provider
HAVING sum(usd) <> 0
ORDER BY provider;

-- name: dedup_totals :many
-- Per provider, steps reused instead of paid and the USD they did not cost, on UTC days from
-- $1 on and in all, from the savings counters (0016: folded per day plus the deltas not
-- folded yet): O(providers x days), not O(results).
SELECT provider,
       coalesce(sum(steps) FILTER (WHERE day >= $1), 0)::bigint AS steps_since,
       coalesce(sum(usd) FILTER (WHERE day >= $1), 0)::float8 AS usd_since,
       sum(steps)::bigint AS steps_total,
       sum(usd)::float8 AS usd_total
FROM (SELECT provider, day, steps, usd FROM listener.dedup_by_day
      UNION ALL
      SELECT provider, day, steps, usd FROM listener.dedup_deltas) AS s
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

-- name: requeue_jobs :many
-- Operator's retry: the finished jobs in statuses $1 that match the filters ($2 text in the
-- reason, $3 owner, $4 table) become pending now, attempts reset. A complete job starts from
-- scratch (its results are removed); a failed or cancelled one resumes after the steps it had
-- stored.
WITH targets AS (
    SELECT id, status FROM listener.jobs
    WHERE status = ANY($1::text[]) AND status IN ('failed', 'cancelled', 'complete')
      AND ($2::text IS NULL OR last_error ILIKE '%' || $2 || '%')
      AND ($3::text IS NULL OR owner_id = $3)
      AND ($4::text IS NULL OR source_table = $4)
    FOR UPDATE
), picked AS (
    UPDATE listener.jobs AS j
    SET status = 'pending', attempts = 0, run_after = now(), last_error = NULL,
        finished_at = NULL, lease_token = NULL, lease_expires_at = NULL, batch_id = NULL,
        batch_step = NULL, updated_at = now()
    FROM targets WHERE j.id = targets.id
    RETURNING j.id, targets.status AS was
), forgotten AS (
    DELETE FROM listener.results AS r
    USING picked WHERE r.job_id = picked.id AND picked.was = 'complete'
)
SELECT id FROM picked;

-- name: snooze_jobs :many
-- Jobs that could not run for a reason not their own (budget, paused or rate-limited
-- provider): pending after the delay, and the attempt given back; fenced by lease token.
-- held_by ($5) names the operator pause or the spent budget that holds it, if any, so that
-- `listener resume` can wake it before its delay ends. An operator pause holds a job only
-- while its row is in force, locked here (KEY SHARE) against `listener resume` (resume_pause
-- deletes the row, then wakes the jobs it holds, in one transaction): a pause lifted before
-- this statement leaves the job runnable now and held by nothing (the daemon read its pauses
-- before the resume), and one lifted after it waits for this commit, then wakes the job.
WITH held AS (
    SELECT provider FROM listener.pauses
    WHERE provider = ANY($5::text[]) AND (until IS NULL OR until > now())
    FOR KEY SHARE
), f AS (
    SELECT u.id, u.token, u.error, u.held_by, u.delay_s,
           u.held_by IS NULL OR u.held_by = 'budget'
           OR u.held_by IN (SELECT provider FROM held) AS holds
    FROM unnest($1::bigint[], $2::uuid[], $3::float8[], $4::text[], $5::text[])
         AS u(id, token, delay_s, error, held_by)
)
UPDATE listener.jobs AS j
SET status = 'pending',
    run_after = now() + make_interval(secs => CASE WHEN f.holds THEN f.delay_s ELSE 0 END),
    attempts = greatest(j.attempts - 1, 0), last_error = f.error,
    held_by = CASE WHEN f.holds THEN f.held_by END,
    lease_expires_at = NULL, lease_token = NULL, updated_at = now()
FROM f
WHERE j.id = ANY($1::bigint[]) AND j.id = f.id AND j.lease_token = f.token
  AND j.status = 'processing'
RETURNING j.id;

-- name: discard_jobs :many
-- Dead letter: failed for good with the reason ($3); fenced by lease token.
UPDATE listener.jobs AS j
SET status = 'failed', finished_at = now(), last_error = f.error,
    lease_expires_at = NULL, lease_token = NULL, updated_at = now()
FROM unnest($1::bigint[], $2::uuid[], $3::text[]) AS f(id, token, error)
WHERE j.id = ANY($1::bigint[]) AND j.id = f.id AND j.lease_token = f.token
  AND j.status = 'processing'
RETURNING j.id;

-- name: release_jobs :many
-- Graceful shutdown: hands unfinished jobs back as pending, runnable at once. The attempt is
-- not counted: the job did not fail, its worker stopped. Fenced per job by its token.
UPDATE listener.jobs AS j
SET status = 'pending', attempts = greatest(j.attempts - 1, 0), run_after = now(),
    lease_expires_at = NULL, lease_token = NULL, updated_at = now()
FROM unnest($1::bigint[], $2::uuid[]) AS d(id, token)
WHERE j.id = ANY($1::bigint[]) AND j.id = d.id AND j.lease_token = d.token
  AND j.status = 'processing'
RETURNING j.id;

-- name: reap_expired_leases :many
-- Jobs whose worker stopped renewing the lease (killed, frozen, cut off): back to pending, or
-- failed when their attempts are used up (a job that kills its worker must not loop forever).
-- SKIP LOCKED lets every daemon run this without waiting on each other.
WITH expired AS (
    SELECT id
    FROM listener.jobs
    WHERE status = 'processing' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT $1
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
-- Counts by status from the counters (0008: folded counts plus the deltas not folded yet, one
-- snapshot, exact) and the oldest pending age (see oldest_pending): O(tables), not O(jobs).
-- Rows inserted but not admitted yet (0019) count as pending: O(rows waiting), a handful
-- while a daemon runs.
SELECT coalesce(sum(n) FILTER (WHERE status = 'pending'), 0)::bigint AS pending,
       coalesce(sum(n) FILTER (WHERE status = 'processing'), 0)::bigint AS processing,
       coalesce(sum(n) FILTER (WHERE status = 'complete'), 0)::bigint AS complete,
       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed,
       coalesce(sum(n) FILTER (WHERE status = 'cancelled'), 0)::bigint AS cancelled,
       coalesce(sum(n) FILTER (WHERE status = 'batched'), 0)::bigint AS batched,
       (SELECT listener.oldest_pending_s()) AS oldest_pending_s
FROM (SELECT status, n FROM listener.job_counts_by_table
      UNION ALL
      SELECT status, delta FROM listener.job_count_deltas
      UNION ALL
      SELECT 'pending', count(*) FROM listener.inserted_rows) AS c;

-- name: roll_up_job_counts :one
-- Folds the counters' deltas into the counts (listener.roll_up_job_counts in 0008) and the
-- deduplication savings' (listener.roll_up_dedup_savings in 0016); 0 when another rollup is
-- running. Keeps the deltas readers add up few.
SELECT listener.roll_up_job_counts() + listener.roll_up_dedup_savings() AS folded;

-- name: oldest_pending :one
-- Seconds the longest-waiting runnable pending job has waited (now - run_after; a new job's
-- run_after is its insert time): the first entry of jobs_claim_idx per priority.
SELECT listener.oldest_pending_s() AS oldest_pending_s;

-- name: outboxes :many
-- The queues listener keeps beside the jobs, one row each, in this order, with the rows
-- waiting (depth) and the age of the oldest in seconds (0 when none waits):
--   status    listener.status_outbox: job changes not written back to the app's row yet
--             (since queued_at, 0025), drained by the status write-back;
--   events    listener.event_outbox: terminal events not delivered to the webhook yet (since
--             created_at), drained by the webhook sender; empty unless webhooks are enabled;
--   deleted   listener.deleted_rows: app rows deleted whose jobs, results and faces are not
--             cleaned up yet (since deleted_at), drained by the deletes' clean-up;
--   inserted  listener.inserted_rows: app rows inserted and not admitted as jobs yet (since
--             inserted_at, 0025), admitted by the daemons' claims.
-- Bounded whatever the backlog: depth counts the first 10,001 primary-key entries (an index
-- scan with a LIMIT; index-only where the visibility map allows), so it is exact up to 10,000
-- (exact = true) and beyond is the planner's estimate of the table's rows (pg_class.reltuples,
-- kept by autovacuum and ANALYZE), never less than 10,001 (exact = false). The oldest row of
-- the three tables keyed by a sequence is the one with the lowest id (ids are taken in insert
-- order; a row's time is its transaction's start), one index probe; status_outbox is keyed by
-- job id, not time, so its oldest is the oldest of the rows counted (a lower bound of the age
-- beyond 10,000 rows).
SELECT o.outbox, o.relation AS "table",
       CASE WHEN o.n <= 10000 THEN o.n
            ELSE greatest(o.n, (SELECT c.reltuples::bigint FROM pg_catalog.pg_class AS c
                                WHERE c.oid = o.relation::regclass))
       END AS depth,
       o.n <= 10000 AS exact,
       greatest(coalesce(extract(epoch FROM now() - o.oldest), 0), 0)::float8 AS oldest_age_s
FROM (
    SELECT 1 AS ord, 'status' AS outbox, 'listener.status_outbox' AS relation, s.n, s.oldest
    FROM (SELECT count(*) AS n, min(x.queued_at) AS oldest
          FROM (SELECT queued_at FROM listener.status_outbox ORDER BY job_id LIMIT 10001) AS x
    ) AS s
    UNION ALL
    SELECT 2, 'events', 'listener.event_outbox',
           (SELECT count(*) FROM (SELECT id FROM listener.event_outbox ORDER BY id LIMIT 10001)
                                 AS x),
           (SELECT created_at FROM listener.event_outbox ORDER BY id LIMIT 1)
    UNION ALL
    SELECT 3, 'deleted', 'listener.deleted_rows',
           (SELECT count(*) FROM (SELECT id FROM listener.deleted_rows ORDER BY id LIMIT 10001)
                                 AS x),
           (SELECT deleted_at FROM listener.deleted_rows ORDER BY id LIMIT 1)
    UNION ALL
    SELECT 4, 'inserted', 'listener.inserted_rows',
           (SELECT count(*) FROM (SELECT id FROM listener.inserted_rows ORDER BY id LIMIT 10001)
                                 AS x),
           (SELECT inserted_at FROM listener.inserted_rows ORDER BY id LIMIT 1)
) AS o
ORDER BY o.ord;

-- name: attach :one
-- Installs the enqueue triggers on a table, with its write-back columns, and the delete
-- trigger (see listener.attach in 0005_status_writeback.sql, 0011_result_columns.sql and
-- 0014_deletes.sql).
SELECT listener.attach($1::text, $2::text, $3::text, $4::text, $5::text, $6::text, $7::text,
                       $8::text) AS source_table;

-- name: detach :one
-- Removes the enqueue triggers from a table; false when it was not attached.
SELECT listener.detach($1) AS detached;

-- name: attachment :one
-- The attachment of one table; raises undefined_object when the table is not attached.
SELECT source_table, id_column, id_type, url_column, owner_column, status_column,
       result_column, error_column, analyzed_at_column
FROM listener.attachment($1);

-- name: list_attachments :many
-- Every attached table.
SELECT source_table, id_column, id_type, url_column, owner_column, status_column,
       result_column, error_column, analyzed_at_column, created_at
FROM listener.attachments
ORDER BY source_table;

-- name: count_unqueued :one
-- Rows of an attached table (optionally one owner's) that have no job yet.
SELECT listener.count_unqueued($1, $2) AS count;

-- name: backfill_chunk :one
-- Enqueues the next chunk of rows without a job (keyset pagination after $2).
SELECT last_id, scanned, enqueued FROM listener.backfill_chunk($1, $2, $3, $4, $5, $6, $7);

-- name: table_progress :one
-- Progress of one table's jobs (optionally one owner's): still to do (from the counters, 0008),
-- finished since $3 and what their results cost since $3 (ranges of jobs_finished_idx and
-- results_created_idx): O(jobs finished since $3), not O(jobs of the table).
SELECT (SELECT coalesce(sum(x.n), 0)::bigint
        FROM (SELECT c.n FROM listener.job_counts AS c
              WHERE c.source_table = $1 AND ($2::text IS NULL OR c.owner_id = $2)
                AND c.status IN ('pending', 'processing', 'batched')
              UNION ALL
              SELECT d.delta FROM listener.job_count_deltas AS d
              WHERE d.source_table = $1 AND ($2::text IS NULL OR d.owner_id = $2)
                AND d.status IN ('pending', 'processing', 'batched')) AS x) AS remaining,
       count(*) FILTER (WHERE status = 'complete') AS complete,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       (SELECT coalesce(sum(r.cost_usd), 0)::float8
        FROM listener.results AS r JOIN listener.jobs AS j ON j.id = r.job_id
        WHERE r.created_at >= $3 AND j.source_table = $1
          AND ($2::text IS NULL OR j.owner_id = $2)) AS spend_usd
FROM listener.jobs
WHERE finished_at >= $3 AND finished_at IS NOT NULL
  AND source_table = $1 AND ($2::text IS NULL OR owner_id = $2);

-- name: table_jobs :many
-- Every job of one table with its result for step $2, oldest first (the demo's report).
SELECT j.id, j.source_id, j.image_url, j.status, j.attempts, j.last_error, r.output,
       r.duration_ms
FROM listener.jobs AS j
LEFT JOIN listener.results AS r ON r.job_id = j.id AND r.step = $2
WHERE j.source_table = $1
ORDER BY j.id;

-- name: known_face_ids :many
-- Which of the given FaceIds listener has recorded (matches to others are ignored).
SELECT face_id FROM listener.faces WHERE face_id = ANY($1::text[]);

-- name: record_face_intent :one
-- Job $1's faces step, under claim $2 (lease token $3), is about to send IndexFaces to
-- collection $4 for ExternalImageId $5: recorded first, fenced by the lease. No row: the
-- lease is lost, and the request must not be sent.
INSERT INTO listener.face_index_intents (job_id, claims, collection_id, external_image_id)
SELECT j.id, $2, $4, $5
FROM listener.jobs AS j
WHERE j.id = $1 AND j.lease_token = $3 AND j.status = 'processing'
ON CONFLICT (job_id, claims) DO UPDATE
SET collection_id = EXCLUDED.collection_id, external_image_id = EXCLUDED.external_image_id,
    created_at = now()
RETURNING job_id;

-- name: earlier_face_intents :many
-- IndexFaces requests that claims of job $1 before claim $2 sent (or were about to send) and
-- never stored: (collection, ExternalImageId), each once.
SELECT DISTINCT collection_id, external_image_id
FROM listener.face_index_intents
WHERE job_id = $1 AND claims < $2
ORDER BY collection_id, external_image_id;

-- name: forget_face_intents :execute
-- Job $1's faces step is stored: its IndexFaces requests are accounted for.
DELETE FROM listener.face_index_intents WHERE job_id = $1;

-- name: nearest_faces :many
-- The faces of collection $1 whose embedding lies within Euclidean distance $5 of embedding $2
-- (real[]), nearest first, $6 of them; the faces of app row ($3 table, $4 id) are left out (a
-- re-analysis replaces them). Reads one collection (faces_collection_idx); the distance is
-- computed for each of its faces.
SELECT f.face_id, d.distance
FROM listener.faces AS f
CROSS JOIN LATERAL (
    SELECT sqrt(sum((u.a - u.b) * (u.a - u.b)))::float8 AS distance
    FROM unnest(f.embedding, $2::real[]) AS u(a, b)
) AS d
WHERE f.collection_id = $1
  AND cardinality(f.embedding) = cardinality($2::real[])
  AND NOT (f.source_table = $3 AND f.source_id = $4)
  AND d.distance <= $5
ORDER BY d.distance, f.face_id
LIMIT $6;

-- name: row_face_ids :many
-- The faces recorded for app row ($1 table, $2 id), with their collection (faces_source_idx).
SELECT collection_id, face_id FROM listener.faces
WHERE source_table = $1 AND source_id = $2
ORDER BY collection_id, face_id;

-- name: people_counts :one
-- People and faces recorded, and open suggestions.
SELECT (SELECT count(*) FROM listener.people) AS people,
       (SELECT count(*) FROM listener.faces) AS faces,
       (SELECT count(*) FROM listener.face_suggestions WHERE status = 'open') AS suggestions;

-- name: counts_by_table :many
-- Jobs by status for each table with jobs, from the counters (folded plus deltas, one
-- snapshot): O(tables x statuses + deltas not folded yet). Rows inserted but not admitted yet
-- (0019) count as pending.
SELECT source_table AS table,
       coalesce(sum(n) FILTER (WHERE status = 'pending'), 0)::bigint AS pending,
       coalesce(sum(n) FILTER (WHERE status = 'processing'), 0)::bigint AS processing,
       coalesce(sum(n) FILTER (WHERE status = 'complete'), 0)::bigint AS complete,
       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed,
       coalesce(sum(n) FILTER (WHERE status = 'cancelled'), 0)::bigint AS cancelled,
       coalesce(sum(n) FILTER (WHERE status = 'batched'), 0)::bigint AS batched
FROM (SELECT source_table, status, n FROM listener.job_counts_by_table
      UNION ALL
      SELECT source_table, status, delta FROM listener.job_count_deltas
      UNION ALL
      SELECT source_table, 'pending', count(*) FROM listener.inserted_rows
      GROUP BY source_table) AS c
GROUP BY source_table
HAVING sum(n) <> 0
ORDER BY source_table;

-- name: counts_by_owner :many
-- Jobs by status for the $1 owners with the most work left (pending, processing, batched),
-- filled up to $1 with the owners with the most complete jobs; from the counters, reading
-- only owners with work left (job_counts_left_idx) and $1 more (job_counts_complete_idx).
WITH work_left AS (
    SELECT source_table, owner_id
    FROM (SELECT source_table, owner_id, n FROM listener.job_counts
          WHERE status IN ('pending', 'processing', 'batched') AND n > 0
          UNION ALL
          SELECT source_table, owner_id, delta FROM listener.job_count_deltas
          WHERE status IN ('pending', 'processing', 'batched')) AS x
    GROUP BY 1, 2
    HAVING sum(n) > 0
    ORDER BY sum(n) DESC, 1, 2
    LIMIT $1
), most_done AS (
    SELECT source_table, owner_id FROM listener.job_counts
    WHERE status = 'complete' AND n > 0
    ORDER BY n DESC
    LIMIT $1
), picked AS (
    SELECT source_table, owner_id FROM work_left
    UNION
    SELECT source_table, owner_id FROM most_done
), counted AS (
    SELECT c.source_table, c.owner_id, c.status, c.n
    FROM picked AS p
    JOIN listener.job_counts AS c
      ON c.source_table = p.source_table
     AND coalesce(c.owner_id, '') = coalesce(p.owner_id, '')
     AND (c.owner_id IS NULL) = (p.owner_id IS NULL)
    UNION ALL
    SELECT d.source_table, d.owner_id, d.status, d.delta
    FROM listener.job_count_deltas AS d
    JOIN picked AS p
      ON d.source_table = p.source_table
     AND coalesce(d.owner_id, '') = coalesce(p.owner_id, '')
     AND (d.owner_id IS NULL) = (p.owner_id IS NULL)
)
SELECT source_table AS table, owner_id AS owner,
       coalesce(sum(n) FILTER (WHERE status = 'pending'), 0)::bigint AS pending,
       coalesce(sum(n) FILTER (WHERE status = 'processing'), 0)::bigint AS processing,
       coalesce(sum(n) FILTER (WHERE status = 'complete'), 0)::bigint AS complete,
       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed
FROM counted
GROUP BY source_table, owner_id
HAVING sum(n) <> 0
ORDER BY coalesce(sum(n) FILTER (WHERE status IN ('pending', 'processing', 'batched')), 0) DESC,
         sum(n) DESC, source_table, owner_id
LIMIT $1;

-- name: failure_reasons :many
-- The most common reasons among the last 500 failures (jobs_failed_idx, newest first), URLs
-- folded so that one cause is one line: O(500), however many jobs failed. A URL ends before
-- the punctuation that follows it ("fetch <url>: refused", "(from <url>),").
SELECT regexp_replace(coalesce(last_error, 'unknown'),
                      '(https?|file)://\S*[^]\s.,:;!?''")}>]', '<url>', 'g') AS reason,
       count(*) AS count
FROM (SELECT last_error FROM listener.jobs
      WHERE status = 'failed' AND finished_at IS NOT NULL
      ORDER BY finished_at DESC
      LIMIT 500) AS recent
GROUP BY 1
ORDER BY 2 DESC, 1
LIMIT $1;

-- name: recent_failures :many
-- The last $1 failed jobs: a backward scan of jobs_failed_idx, O($1).
SELECT id AS job_id, source_table AS table, source_id, image_url AS url, last_error AS error,
       finished_at AS at
FROM listener.jobs
WHERE status = 'failed' AND finished_at IS NOT NULL
ORDER BY finished_at DESC
LIMIT $1;

-- name: throughput_per_minute :many
-- Jobs that became complete or failed, per minute over the last hour, from the per-minute
-- counters (0008: folded plus the deltas not folded yet): at most 120 rows, however many
-- jobs finish.
SELECT minute,
       coalesce(sum(n) FILTER (WHERE status = 'complete'), 0)::bigint AS complete,
       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed
FROM (SELECT minute, status, n FROM listener.finished_per_minute
      WHERE minute >= date_trunc('minute', now() - interval '1 hour')
      UNION ALL
      SELECT minute, status, n FROM listener.finish_deltas) AS f
WHERE minute >= date_trunc('minute', now() - interval '1 hour')
GROUP BY minute
HAVING sum(n) <> 0
ORDER BY minute;

-- name: recent_rate :one
-- Jobs that became complete or failed per second over the last $1 seconds, from the
-- per-minute counters (the oldest minute counted in full, so it may read a little high).
SELECT coalesce(sum(n), 0)::float8 / $1 AS rate
FROM (SELECT minute, n FROM listener.finished_per_minute
      WHERE minute >= date_trunc('minute', now() - make_interval(secs => $1))
      UNION ALL
      SELECT minute, n FROM listener.finish_deltas) AS f
WHERE minute >= date_trunc('minute', now() - make_interval(secs => $1));

-- name: open_batches :many
-- Batches not applied yet.
SELECT id, provider, step, status, requests, completed, failed, created_at
FROM listener.batches
WHERE applied_at IS NULL
ORDER BY created_at;

-- name: retry_jobs :many
-- Failed attempts that will run again: pending after the delay ($3, seconds) the retry policy
-- chose, the reason ($4) in last_error; fenced by lease token.
UPDATE listener.jobs AS j
SET status = 'pending', run_after = now() + make_interval(secs => f.delay_s),
    last_error = f.error, lease_expires_at = NULL, lease_token = NULL, updated_at = now()
FROM unnest($1::bigint[], $2::uuid[], $3::float8[], $4::text[]) AS f(id, token, delay_s, error)
WHERE j.id = ANY($1::bigint[]) AND j.id = f.id AND j.lease_token = f.token
  AND j.status = 'processing'
RETURNING j.id;

-- name: cancel_jobs :many
-- Cancels the pending, running and batched jobs that match the filters ($1 text in the
-- reason, $2 owner, $3 table). A running job's worker finds its lease gone and records
-- nothing; a batched job's batch finds it no longer batched and writes nothing to it.
UPDATE listener.jobs
SET status = 'cancelled', finished_at = now(), updated_at = now(),
    last_error = 'cancelled by user', lease_token = NULL, lease_expires_at = NULL
WHERE status IN ('pending', 'processing', 'batched')
  AND ($1::text IS NULL OR last_error ILIKE '%' || $1 || '%')
  AND ($2::text IS NULL OR owner_id = $2)
  AND ($3::text IS NULL OR source_table = $3)
RETURNING id;

-- name: notify_jobs :execute
-- Wakes the daemons (after a retry).
SELECT pg_notify('listener_jobs', '');

-- name: sample_unqueued :many
-- Image URLs of up to $3 rows of table $1 (owner $2) without a job.
SELECT listener.sample_unqueued($1, $2, $3) AS url;

-- name: step_history :many
-- Per step, averages over the most recent 5,000 results, and the share of jobs with a
-- tier-1 result (steps $1) that also have this step's (a gate's pass rate).
WITH recent AS (
    SELECT job_id, step, input_tokens, output_tokens, calls, reuse_kind
    FROM listener.results
    ORDER BY created_at DESC
    LIMIT 5000
), base AS (
    SELECT count(DISTINCT job_id) AS jobs FROM recent WHERE step = ANY($1::text[])
)
-- Copies (deduplication) cost nothing and count no tokens: the averages are over the paid
-- results, and reuse_rate is the share of the step's results that were copies.
SELECT step, count(*) AS results,
       coalesce(avg(input_tokens) FILTER (WHERE reuse_kind IS NULL), 0)::float8
           AS input_tokens,
       coalesce(avg(output_tokens) FILTER (WHERE reuse_kind IS NULL), 0)::float8
           AS output_tokens,
       coalesce(avg(calls) FILTER (WHERE reuse_kind IS NULL), 0)::float8 AS calls,
       coalesce(count(DISTINCT job_id)::float8 / nullif((SELECT jobs FROM base), 0), 1.0)
           AS pass_rate,
       (count(*) FILTER (WHERE reuse_kind IS NOT NULL))::float8 / count(*) AS reuse_rate
FROM recent
GROUP BY step;

-- name: park_jobs :many
-- Parks jobs whose next step waits for a batch, fenced by lease token; the attempt is given
-- back ($3: the step of each job).
UPDATE listener.jobs AS j
SET status = 'batched', batch_step = b.step, batch_id = NULL,
    attempts = greatest(j.attempts - 1, 0), lease_token = NULL, lease_expires_at = NULL,
    updated_at = now()
FROM unnest($1::bigint[], $2::uuid[], $3::text[]) AS b(id, token, step)
WHERE j.id = ANY($1::bigint[]) AND j.id = b.id AND j.lease_token = b.token
  AND j.status = 'processing'
RETURNING j.id;

-- name: batch_waiting :one
-- Steps waiting for a batch, per step: how many, and how long the oldest has waited.
SELECT count(*) AS waiting,
       coalesce(extract(epoch FROM now() - min(updated_at)), 0)::float8 AS oldest_s
FROM listener.jobs
WHERE status = 'batched' AND batch_id IS NULL AND batch_step = $1;

-- name: batch_submitted :one
-- Batch $1 is batch $2 at the provider (status $3): its creator recorded the answer, or a
-- daemon adopted it. Only an open batch without a provider id (or with this one already) takes
-- it, so a batch never changes its provider id: false means the provider's batch $2 is not
-- this row's (the row was closed, or holds another batch) and must be cancelled.
UPDATE listener.batches
SET provider_batch_id = $2,
    status = CASE WHEN provider_batch_id IS NULL THEN $3 ELSE status END,
    updated_at = now()
WHERE id = $1 AND applied_at IS NULL AND (provider_batch_id IS NULL OR provider_batch_id = $2)
RETURNING true AS recorded;

-- name: claim_batch_create :one
-- Claims the creation of recorded batch $1 at the provider: 'submitting' (or 'creating' whose
-- claimer has not been heard of for $2 seconds: it died, or its call failed in a way that
-- leaves the provider's answer unknown) becomes 'creating' since now. One daemon at a time
-- calls the provider for a batch, so it is never created twice by two pollers. False: another
-- daemon is at it, or the batch has its provider id, or was closed.
UPDATE listener.batches SET status = 'creating', updated_at = now()
WHERE id = $1 AND applied_at IS NULL AND provider_batch_id IS NULL
  AND (status = 'submitting'
       OR (status = 'creating' AND updated_at < now() - make_interval(secs => $2)))
RETURNING true AS claimed;

-- name: release_batch_create :execute
-- The provider refused to create batch $1 (it was not created): any daemon may try again now.
UPDATE listener.batches SET status = 'submitting', updated_at = now()
WHERE id = $1 AND status = 'creating' AND provider_batch_id IS NULL AND applied_at IS NULL;

-- name: installation_id :one
-- This database's listener installation: the id its provider batches carry.
SELECT id::text AS id FROM listener.installation;

-- name: batch_records :many
-- What listener knows of batches $1 (our ids): the provider's batch id, whether it is closed.
SELECT id, provider_batch_id, status, applied_at IS NOT NULL AS closed
FROM listener.batches
WHERE id = ANY($1::text[]);

-- name: prune_unsent_batches :one
-- Retention: deletes up to $2 batches that never reached the provider ('empty', 'abandoned')
-- closed more than $1 seconds ago, with their requests; returns how many. Locked rows are left
-- for the next round.
WITH old AS (
    SELECT id FROM listener.batches
    WHERE status IN ('empty', 'abandoned')
      AND applied_at < now() - make_interval(secs => $1)
    ORDER BY applied_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM listener.batches AS b USING old WHERE b.id = old.id RETURNING 1
)
SELECT count(*)::int AS deleted FROM gone;

-- name: open_batch_rows :many
-- Batches not applied yet, oldest first.
SELECT id, provider_batch_id, step, status, input_file_id, requests, created_at
FROM listener.batches
WHERE applied_at IS NULL
ORDER BY created_at;

-- name: batch_progress :execute
-- Status and counts of a batch as the provider reports them.
UPDATE listener.batches
SET status = $2, completed = $3, failed = $4, output_file_id = $5, error_file_id = $6,
    error = $7, updated_at = now()
WHERE id = $1;

-- name: take_for_batch :many
-- Takes up to $2 jobs waiting with step $1 into a new batch $3, in one short statement: the
-- batch row is inserted 'preparing' (no file yet) and the jobs get its id. SKIP LOCKED: one
-- daemon each. The images are fetched and the file uploaded after the commit, outside any
-- transaction; the batch fence (batch_id, status, batch_step) guards every later write.
-- updated_at is left alone: it is when the job started waiting (batch_waiting, the order).
-- outputs: the job's stored step outputs, which the request's prompt builds on.
WITH picked AS (
    SELECT id
    FROM listener.jobs
    WHERE status = 'batched' AND batch_id IS NULL AND batch_step = $1
    ORDER BY priority, updated_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE listener.jobs AS j
    SET batch_id = $3
    FROM picked
    WHERE j.id = picked.id
    RETURNING j.id, j.source_table, j.source_id, j.image_url, j.owner_id
), batch AS (
    INSERT INTO listener.batches (id, provider, step, status, requests)
    SELECT $3, $4, $1, 'preparing', count(*)::int FROM marked HAVING count(*) > 0
)
SELECT m.id, m.source_table, m.source_id, m.image_url, m.owner_id,
       coalesce((SELECT jsonb_object_agg(r.step, r.output) FROM listener.results AS r
                 WHERE r.job_id = m.id), '{}'::jsonb) AS outputs
FROM marked AS m
ORDER BY m.id;

-- name: keep_preparing :one
-- Heartbeat of a batch being prepared ($1), so the abandoned sweep leaves it alone; false
-- when it was swept (its jobs went back: the preparation must stop).
UPDATE listener.batches SET updated_at = now()
WHERE id = $1 AND status = 'preparing' AND applied_at IS NULL
RETURNING true AS kept;

-- name: record_batch_file :one
-- The input file of batch $1 is uploaded ($2) with requests $3 (custom ids) for jobs $4:
-- 'preparing' becomes 'submitting', fenced by the status so that a batch the abandoned sweep
-- took back is never created. Requests of jobs deleted since are left out (foreign key).
WITH b AS (
    UPDATE listener.batches
    SET status = 'submitting', input_file_id = $2, requests = cardinality($3::text[]),
        updated_at = now()
    WHERE id = $1 AND status = 'preparing' AND applied_at IS NULL
    RETURNING id, step
), r AS (
    INSERT INTO listener.batch_requests (custom_id, batch_id, job_id, step)
    SELECT x.c, b.id, x.j, b.step
    FROM b, unnest($3::text[], $4::bigint[]) AS x(c, j)
    WHERE EXISTS (SELECT 1 FROM listener.jobs AS j WHERE j.id = x.j)
)
SELECT count(*) > 0 AS recorded FROM b;

-- name: batch_to_per_image :many
-- Jobs of batch $1 whose request could not be written (the image cannot be read, $3 why):
-- pending now, out of batch mode, so the per-image path runs them and records the reason.
-- Fenced by (id, batch_id, status 'batched').
UPDATE listener.jobs AS j
SET status = 'pending', batch_id = NULL, batch_step = NULL, batch_mode = false,
    run_after = now(), last_error = f.error, updated_at = now()
FROM unnest($2::bigint[], $3::text[]) AS f(id, error)
WHERE j.id = ANY($2::bigint[]) AND j.id = f.id AND j.batch_id = $1 AND j.status = 'batched'
RETURNING j.id;

-- name: return_to_wait :many
-- Jobs $2 taken into batch $1 that did not fit its file: waiting again for the next batch,
-- in their old place (updated_at kept). Fenced by (id, batch_id, status 'batched').
UPDATE listener.jobs AS j
SET batch_id = NULL
WHERE j.id = ANY($2::bigint[]) AND j.batch_id = $1 AND j.status = 'batched'
RETURNING j.id;

-- name: sweep_abandoned_batches :many
-- Batches left 'preparing' with no file for $1 seconds (their daemon crashed or hung) are
-- closed and their jobs wait again for a batch, so nothing is stuck. SKIP LOCKED: a batch
-- whose preparer is recording its file right now is left to it.
WITH stale AS (
    SELECT id FROM listener.batches
    WHERE status = 'preparing' AND applied_at IS NULL AND input_file_id IS NULL
      AND updated_at < now() - make_interval(secs => $1)
    FOR UPDATE SKIP LOCKED
), closed AS (
    UPDATE listener.batches AS b
    SET status = 'abandoned', applied_at = now(), updated_at = now()
    FROM stale WHERE b.id = stale.id
    RETURNING b.id
)
UPDATE listener.jobs AS j
SET batch_id = NULL
FROM closed
WHERE j.batch_id = closed.id AND j.status = 'batched'
RETURNING j.id;

-- name: jobs_in_batch :one
-- How many jobs batch $1 still holds (cancelled jobs and changed URLs have left it).
SELECT count(*) AS n FROM listener.jobs WHERE batch_id = $1 AND status = 'batched';

-- name: apply_batch_result :many
-- Applies finished batch $1 (step $2) once, in one statement under the batch's row lock
-- (SKIP LOCKED: another daemon applying it wins; applied_at: never twice). Only jobs still
-- in the batch (batch_id $1, status 'batched', batch_step $2) are touched: a cancelled job, or
-- one whose URL changed, gets nothing. Their results ($3 jobs, $4-$10 columns) are stored at
-- the price given; every one of them is handed back pending, runnable now; those in $11
-- (failed lines, reasons $12) leave batch mode and record the reason, so they run per image.
-- Returns one row per stored result, or one row with job_id NULL when nothing was stored;
-- no row at all when the batch was applied already (or is being applied elsewhere).
WITH b AS (
    SELECT id FROM listener.batches
    WHERE id = $1 AND step = $2 AND applied_at IS NULL
    FOR UPDATE SKIP LOCKED
), members AS (
    SELECT j.id FROM listener.jobs AS j, b
    WHERE j.batch_id = b.id AND j.status = 'batched' AND j.batch_step = $2
    FOR UPDATE OF j
), saved AS (
    INSERT INTO listener.results AS r
        (job_id, step, provider, output, model, duration_ms, input_tokens, output_tokens,
         calls, cost_usd)
    SELECT s.job_id, $2, s.provider, s.output, s.model, NULL, s.input_tokens, s.output_tokens,
           s.calls, s.cost_usd
    FROM unnest($3::bigint[], $4::text[], $5::jsonb[], $6::text[], $7::int[], $8::int[],
                $9::int[], $10::numeric[])
         AS s(job_id, provider, output, model, input_tokens, output_tokens, calls, cost_usd)
    WHERE s.job_id IN (SELECT id FROM members)
    ON CONFLICT (job_id, step) DO UPDATE
    SET provider = EXCLUDED.provider, output = EXCLUDED.output, model = EXCLUDED.model,
        input_tokens = EXCLUDED.input_tokens, output_tokens = EXCLUDED.output_tokens,
        calls = EXCLUDED.calls, cost_usd = EXCLUDED.cost_usd, created_at = now()
    RETURNING r.job_id
), released AS (
    UPDATE listener.jobs AS j
    SET status = 'pending', batch_id = NULL, batch_step = NULL, run_after = now(),
        batch_mode = CASE WHEN f.error IS NULL THEN j.batch_mode ELSE false END,
        last_error = coalesce(f.error, j.last_error), updated_at = now()
    FROM members
    LEFT JOIN unnest($11::bigint[], $12::text[]) AS f(id, error) ON f.id = members.id
    WHERE j.id = members.id
    RETURNING j.id
), applied AS (
    UPDATE listener.batches AS x SET applied_at = now(), updated_at = now()
    FROM b WHERE x.id = b.id
    RETURNING x.id
)
SELECT s.job_id, (SELECT count(*) FROM released) AS released
FROM applied LEFT JOIN saved AS s ON true;

-- name: batch_request_jobs :many
-- The requests of batch $1: custom_id -> job id (whatever the job has become since).
SELECT custom_id, job_id FROM listener.batch_requests WHERE batch_id = $1;

-- name: close_batch :one
-- Closes batch $1 that holds no job any more (all cancelled, or their URLs changed), with
-- status $2: applied, nothing written to jobs. False when it was closed or applied already.
UPDATE listener.batches SET status = $2, applied_at = now(), updated_at = now()
WHERE id = $1 AND applied_at IS NULL
RETURNING true AS closed;

-- name: enqueue_job :one
-- Adds a pending job for a source row, as the attach trigger does; NULL when the row already
-- has one. A NULL max_attempts ($6) takes the daemon's default at the first claim.
INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id, priority, max_attempts)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (source_table, source_id) DO NOTHING
RETURNING id;

-- name: job_snapshot :one
-- One job as stored, with its stored steps' cost and calls (and, on a copy, its origin job).
SELECT j.id, j.status, j.attempts, j.max_attempts, j.last_error, j.claims,
       j.lease_token IS NOT NULL AS leased,
       extract(epoch FROM j.run_after - now())::float8 AS run_after_s,
       coalesce((SELECT jsonb_object_agg(r.step, jsonb_build_object(
                    'cost_usd', r.cost_usd::float8, 'calls', r.calls)
                    || CASE WHEN r.reused_from IS NULL THEN '{}'::jsonb
                            ELSE jsonb_build_object('reused_from', r.reused_from) END)
                 FROM listener.results AS r WHERE r.job_id = j.id), '{}'::jsonb) AS steps
FROM listener.jobs AS j
WHERE j.id = $1;

-- name: set_lock_timeout :execute
-- Bounds every lock wait of the current transaction to $1 (e.g. '250ms'): the status
-- write-back gives up on a lock rather than make anyone wait behind it.
SELECT set_config('lock_timeout', $1, true);

-- name: write_back_status :one
-- Writes the current status, results, error and completion time of up to $1 queued jobs (ids
-- after $2) to the app's write-back columns, skipping app rows someone else holds (see
-- listener.write_back_status in 0005 and 0011).
SELECT picked, written, deferred, last_job_id, errors
FROM listener.write_back_status($1, $2);

-- name: status_outbox_waiting :one
-- Whether any status waits to be written back (one index probe; spares the write-back's
-- transaction on idle rounds and on deployments without a status column).
SELECT EXISTS (SELECT 1 FROM listener.status_outbox) AS waiting;

-- name: reanalyze :one
-- Starts rows $2 of table $1 over from scratch at priority $3, with no quota: the operator's
-- and the store's (see listener.reanalyze_rows; apps call listener.reanalyze).
SELECT listener.reanalyze_rows($1::regclass, $2::text[], $3) AS jobs;

-- name: wake_held_jobs :many
-- `listener resume`: the pending jobs held by pause $1 (a provider, '*' or 'budget') may run
-- now; nothing else about them changes. Runs after delete_pause, in its transaction, in a
-- snapshot of its own (read committed): it sees the jobs that snoozes holding the pause's row
-- committed while the delete waited for them (snooze_jobs).
UPDATE listener.jobs
SET run_after = now(), held_by = NULL, updated_at = now()
WHERE held_by = $1 AND status = 'pending'
RETURNING id;

-- name: set_pause :execute
-- `listener pause`: pauses provider $1 ('*': the whole pipeline) for reason $2 until $3
-- (NULL: until resumed); pausing again replaces the reason and the end.
INSERT INTO listener.pauses (provider, reason, until) VALUES ($1, $2, $3)
ON CONFLICT (provider) DO UPDATE SET reason = $2, until = $3, paused_at = now();

-- name: delete_pause :one
-- `listener resume`: lifts the pause of $1; false when it was not paused. Waits for the
-- snoozes that hold its row (snooze_jobs) to commit.
WITH gone AS (DELETE FROM listener.pauses WHERE provider = $1 RETURNING 1)
SELECT EXISTS (SELECT 1 FROM gone);

-- name: notify_pauses :execute
-- The pauses changed: every daemon reads them again before its next claim, and claims.
SELECT pg_notify('listener_jobs', 'pauses');

-- name: active_pauses :many
-- Operator pauses in force now, with the seconds left (NULL: until resumed).
SELECT provider, reason, until, paused_at,
       extract(epoch FROM until - now())::float8 AS remaining_s
FROM listener.pauses
WHERE until IS NULL OR until > now()
ORDER BY provider;

-- name: backfill_ids :many
-- Enqueues rows $2 of table $1 that have no job (see listener.backfill_ids); jobs per owner.
SELECT owner_id, enqueued FROM listener.backfill_ids($1, $2, $3, $4, $5);

-- name: backfill_summary :many
-- Per owner, the jobs of table $1 for rows $2 (NULL: jobs created since $3): counts by status,
-- and the faces found and auto-assigned (faces linked to those jobs that have a person).
SELECT j.owner_id,
       count(*)::int AS jobs,
       count(*) FILTER (WHERE j.status = 'complete')::int AS complete,
       count(*) FILTER (WHERE j.status = 'failed')::int AS failed,
       count(*) FILTER (WHERE j.status IN ('pending', 'processing', 'batched'))::int AS remaining,
       coalesce(sum(f.found), 0)::int AS faces_found,
       coalesce(sum(f.assigned), 0)::int AS faces_assigned
FROM listener.jobs AS j
LEFT JOIN LATERAL (
    SELECT count(*) AS found, count(*) FILTER (WHERE fc.person_id IS NOT NULL) AS assigned
    FROM listener.faces AS fc WHERE fc.job_id = j.id
) AS f ON true
WHERE j.source_table = $1
  AND CASE WHEN $2::text[] IS NULL THEN j.created_at >= $3 ELSE j.source_id = ANY($2) END
GROUP BY j.owner_id
ORDER BY j.owner_id NULLS FIRST;

-- name: backfill_failures :many
-- The reasons the same jobs as backfill_summary failed, most common first.
SELECT j.last_error AS reason, count(*)::int AS count
FROM listener.jobs AS j
WHERE j.source_table = $1 AND j.status = 'failed'
  AND CASE WHEN $2::text[] IS NULL THEN j.created_at >= $3 ELSE j.source_id = ANY($2) END
GROUP BY j.last_error
ORDER BY count(*) DESC, j.last_error
LIMIT 20;

-- name: prune_jobs :one
-- Retention: deletes up to $2 finished jobs finished before $1 whose app row is gone, or with
-- $3 only counts them (see listener.prune_jobs for what is kept and why).
SELECT listener.prune_jobs($1, $2, $3);

-- name: enable_webhooks :execute
-- Terminal events are queued in listener.event_outbox from now on (a daemon started with
-- LISTENER_WEBHOOK_URL runs this before it claims). Writes only when the flag was off.
UPDATE listener.event_settings SET webhooks = true, updated_at = now() WHERE NOT webhooks;

-- name: webhooks_enabled :one
-- Whether terminal events are queued for webhooks.
SELECT webhooks FROM listener.event_settings;

-- name: events_due :one
-- Whether some event waits for delivery now (one probe of the due index; spares idle rounds
-- a transaction).
SELECT EXISTS (
    SELECT 1 FROM listener.event_outbox WHERE next_attempt_at <= now()
) AS due;

-- name: claim_events :many
-- Takes up to $1 due events, oldest due first, skipping rows another daemon is taking, and
-- leases them for $2 seconds (next_attempt_at moves past the deliveries' timeout): a daemon
-- that dies mid-delivery leaves them to come due again. attempts counts deliveries started.
WITH due AS (
    SELECT id FROM listener.event_outbox
    WHERE next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE listener.event_outbox AS e
SET attempts = e.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
FROM due
WHERE e.id = due.id
RETURNING e.id, e.event::text AS event, e.attempts;

-- name: events_delivered :execute
-- Events $1 were answered with 2xx: done.
DELETE FROM listener.event_outbox WHERE id = ANY($1::bigint[]);

-- name: events_failed :execute
-- Events $1 (claimed at attempt $2) failed with reasons $4: due again in $3 seconds. Fenced by
-- the attempt, so a daemon whose lease ran out (and whose events another daemon took) does
-- not move them.
UPDATE listener.event_outbox AS e
SET next_attempt_at = now() + make_interval(secs => f.delay_s), last_error = f.error
FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::text[]) AS f(id, attempts, delay_s, error)
WHERE e.id = ANY($1::bigint[]) AND e.id = f.id AND e.attempts = f.attempts;

-- name: face_review_waiting :many
-- Open face suggestions of the $1 owners with the most, each row carrying the total of every
-- owner: the counters of 0015 (folded counts plus the deltas not folded yet, one snapshot,
-- exact), so it costs the owners with open suggestions, not the suggestions.
WITH per_owner AS (
    SELECT owner_id, sum(n) AS n
    FROM (SELECT owner_id, n FROM listener.face_review_counts
          UNION ALL
          SELECT owner_id, delta FROM listener.face_review_deltas) AS c
    GROUP BY owner_id
    HAVING sum(n) > 0
)
SELECT owner_id AS owner, n::bigint AS suggestions, (sum(n) OVER ())::bigint AS total
FROM per_owner
ORDER BY n DESC, owner_id NULLS FIRST
LIMIT $1;

-- name: roll_up_face_review_counts :one
-- Folds the open suggestions' deltas into their counts (0015); 0 when another rollup runs.
SELECT listener.roll_up_face_review_counts() AS folded;

-- name: face_counts :one
-- People, faces, faces in no person and open suggestions of owner $1 (NULL: rows without one).
SELECT people, faces, unassigned, open_suggestions FROM listener.face_counts($1);

-- name: face_counts_by_owner :many
-- The same for every owner, the $1 with the most open suggestions (then faces) first. Reads
-- every face: for the operator's CLI, not for status.
SELECT owner_id AS owner, sum(people)::bigint AS people, sum(faces)::bigint AS faces,
       sum(unassigned)::bigint AS unassigned, sum(open)::bigint AS open_suggestions
FROM (SELECT owner_id, count(*) AS people, 0 AS faces, 0 AS unassigned, 0 AS open
      FROM listener.people GROUP BY owner_id
      UNION ALL
      SELECT owner_id, 0, count(*), count(*) FILTER (WHERE person_id IS NULL), 0
      FROM listener.faces GROUP BY owner_id
      UNION ALL
      SELECT owner_id, 0, 0, 0, count(*)
      FROM listener.face_suggestions WHERE status = 'open' GROUP BY owner_id) AS c
GROUP BY owner_id
ORDER BY sum(open) DESC, sum(faces) DESC, owner_id NULLS FIRST
LIMIT $1;

-- name: face_people :many
-- People of owner $1, most faces first, $2 of them (listener.face_people, the app's function).
SELECT $1::text AS owner, person_id, name, faces, sample_face_id, sample_source_table,
       sample_source_id, sample_bounding_box::text AS sample_bounding_box, created_at
FROM listener.face_people($1, $2, 0);

-- name: face_people_every_owner :many
-- People of every owner, most faces first, $1 of them: face_people without the owner filter.
SELECT p.owner_id AS owner, p.id AS person_id, p.name, n.faces, s.face_id AS sample_face_id,
       s.source_table AS sample_source_table, s.source_id AS sample_source_id,
       s.bounding_box::text AS sample_bounding_box, p.created_at
FROM listener.people AS p
CROSS JOIN LATERAL (
    SELECT count(*) AS faces FROM listener.faces AS f WHERE f.person_id = p.id
) AS n
LEFT JOIN LATERAL (
    SELECT f.face_id, f.source_table, f.source_id, f.bounding_box
    FROM listener.faces AS f WHERE f.person_id = p.id
    ORDER BY f.confidence DESC NULLS LAST, f.face_id
    LIMIT 1
) AS s ON true
ORDER BY n.faces DESC, p.id
LIMIT $1;

-- name: open_face_suggestions :many
-- Open suggestions of owner $1, most similar first, $2 of them (listener.open_face_suggestions).
SELECT $1::text AS owner, face_id, source_table, source_id, bounding_box::text AS bounding_box,
       candidate_face_id, candidate_source_table, candidate_source_id,
       candidate_bounding_box::text AS candidate_bounding_box, person_id, person_name,
       similarity, created_at
FROM listener.open_face_suggestions($1, $2, 0);

-- name: open_face_suggestions_every_owner :many
-- Open suggestions of every owner, most similar first, $1 of them.
SELECT s.owner_id AS owner, s.face_id, f.source_table, f.source_id,
       f.bounding_box::text AS bounding_box, s.candidate_face_id,
       c.source_table AS candidate_source_table, c.source_id AS candidate_source_id,
       c.bounding_box::text AS candidate_bounding_box, c.person_id, p.name AS person_name,
       s.similarity, s.created_at
FROM listener.face_suggestions AS s
JOIN listener.faces AS f ON f.face_id = s.face_id
LEFT JOIN listener.faces AS c ON c.face_id = s.candidate_face_id
LEFT JOIN listener.people AS p ON p.id = c.person_id
WHERE s.status = 'open'
ORDER BY s.similarity DESC, s.created_at, s.face_id, s.candidate_face_id
LIMIT $1;

-- name: face_owner :many
-- The owner of face $1 (no row: no such face), for the CLI's commands given no --owner.
SELECT owner_id AS owner FROM listener.faces WHERE face_id = $1;

-- name: person_owner :many
-- The owner of person $1 (no row: no such person).
SELECT owner_id AS owner FROM listener.people WHERE id = $1;

-- name: accept_suggestion :one
-- Face $2 is the person of candidate $3 (owner $1); the person's id (listener.accept_suggestion).
SELECT listener.accept_suggestion($1, $2, $3) AS person_id;

-- name: reject_suggestion :one
-- Face $2 is not candidate $3's person (owner $1); false when already rejected.
SELECT listener.reject_suggestion($1, $2, $3) AS rejected;

-- name: merge_people :one
-- People $3 join person $2 (owner $1); the faces moved.
SELECT listener.merge_people($1, $2, $3::bigint[]) AS moved;

-- name: rename_person :one
-- Names person $2 (owner $1) $3 (NULL or blank: no name); the name stored.
SELECT listener.rename_person($1, $2, $3) AS name;

-- name: deleted_rows_due :one
-- Whether some deleted row waits for its clean-up now (one probe of the due index; spares
-- idle rounds a transaction).
SELECT EXISTS (
    SELECT 1 FROM listener.deleted_rows WHERE next_attempt_at <= now()
) AS due;

-- name: claim_deleted_rows :many
-- Takes up to $1 due deleted rows, oldest first, skipping rows another daemon is taking, and
-- leases them for $2 seconds (next_attempt_at moves past the clean-up's longest run): a
-- daemon that dies mid-clean-up leaves them to come due again. attempts counts passes and
-- fences the acknowledgements. listener.claim_deleted_rows (0019) first waits for admissions
-- in flight, so an entry whose delete raced the admission of its row gets that row's job.
SELECT id, source_table, source_id, job_id, reinserted, attempts
FROM listener.claim_deleted_rows($1, $2);

-- name: deleted_rows_done :execute
-- Deleted rows $1 (claimed at attempts $2) are cleaned up: done. Fenced by the attempt.
DELETE FROM listener.deleted_rows AS d
USING unnest($1::bigint[], $2::int[]) AS f(id, attempts)
WHERE d.id = ANY($1::bigint[]) AND d.id = f.id AND d.attempts = f.attempts;

-- name: deleted_rows_later :execute
-- Deleted rows $1 (claimed at attempts $2) come back in $3 seconds, with reason $4 (NULL:
-- waiting for a running job's lease to end, no error). Fenced by the attempt.
UPDATE listener.deleted_rows AS d
SET next_attempt_at = now() + make_interval(secs => f.delay_s), last_error = f.error
FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::text[]) AS f(id, attempts, delay_s, error)
WHERE d.id = ANY($1::bigint[]) AND d.id = f.id AND d.attempts = f.attempts;

-- name: forget_rows :many
-- Deleted rows ($1 tables, $2 ids, $3 jobs when deleted, $4 reinserted): cancel running
-- jobs, delete the others with their results, return the faces to delete from their
-- collections (see listener.forget_rows in 0014) as leftovers, [[collection, face id], ...].
SELECT f.ord, f.running_s, f.sweep, f.owner_id, f.restarted,
       (SELECT coalesce(jsonb_agg(jsonb_build_array(x.v->>'collection_id', x.v->>'face_id')
                                  ORDER BY x.n), '[]'::jsonb)
        FROM jsonb_array_elements(f.faces) WITH ORDINALITY AS x(v, n))::text AS leftovers
FROM listener.forget_rows($1::text[], $2::text[], $3::bigint[], $4::boolean[]) AS f
ORDER BY f.ord;

-- name: forget_faces :one
-- Faces $1 of deleted rows are gone from their collections: delete their rows (see
-- listener.forget_faces in 0014).
SELECT listener.forget_faces($1::text[]) AS forgotten;
