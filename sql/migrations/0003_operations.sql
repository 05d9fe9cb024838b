-- 0003_operations: cancelled jobs, batched jobs, and the OpenAI batches that hold them.

ALTER TABLE listener.jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE listener.jobs ADD CONSTRAINT jobs_status_check CHECK (
    status IN ('pending', 'processing', 'complete', 'failed', 'cancelled', 'batched'));

-- Failure reasons and throughput read finished jobs by time.
CREATE INDEX jobs_failed_idx ON listener.jobs (finished_at) WHERE status = 'failed';

-- Jobs that go through OpenAI's Batch API. batch_mode: true (backfill --batch), false (never:
-- its batch request failed, it runs realtime), NULL (the daemon decides: low-priority jobs
-- go to batches when automatic batching is on). A job whose next step is an OpenAI step waits as
-- 'batched' with that step in batch_step until a batch takes it (batch_id) and is applied.
ALTER TABLE listener.jobs
    ADD COLUMN batch_mode boolean,
    ADD COLUMN batch_step text,
    ADD COLUMN batch_id   text;
CREATE INDEX jobs_batch_wait_idx ON listener.jobs (batch_step, updated_at)
    WHERE status = 'batched' AND batch_id IS NULL;

-- A provider batch. Its row, its requests and the jobs it holds are written in one
-- transaction before the batch is created at the provider (status 'submitting'), so a crash
-- at any point loses nothing: a daemon that finds a 'submitting' batch adopts it (the
-- provider's batch carries our id in its metadata) or resubmits it.
CREATE TABLE listener.batches (
    id                text        PRIMARY KEY,
    provider          text        NOT NULL,
    provider_batch_id text        UNIQUE,
    step              text        NOT NULL,
    status            text        NOT NULL,
    input_file_id     text        NOT NULL,
    output_file_id    text,
    error_file_id     text,
    requests          integer     NOT NULL,
    completed         integer     NOT NULL DEFAULT 0,
    failed            integer     NOT NULL DEFAULT 0,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    applied_at        timestamptz
);
CREATE INDEX batches_open_idx ON listener.batches (created_at) WHERE applied_at IS NULL;

-- Which job's step each request of a batch is: custom_id is the request's key in the files.
CREATE TABLE listener.batch_requests (
    custom_id text   PRIMARY KEY,
    batch_id  text   NOT NULL REFERENCES listener.batches (id) ON DELETE CASCADE,
    job_id    bigint NOT NULL REFERENCES listener.jobs (id) ON DELETE CASCADE,
    step      text   NOT NULL
);
CREATE INDEX batch_requests_batch_idx ON listener.batch_requests (batch_id);

-- sample_unqueued(table, owner, n): image URLs of up to n rows without a job, for estimates.
CREATE FUNCTION listener.sample_unqueued(p_table text, p_owner text, p_limit integer)
RETURNS SETOF text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    a listener.attachments := listener.attachment(p_table);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT s.%I::text FROM %s AS s WHERE ($1::text IS NULL OR s.%I::text = $1) '
        'AND s.%I IS NOT NULL AND NOT EXISTS (SELECT 1 FROM listener.jobs AS j '
        'WHERE j.source_table = %L AND j.source_id = s.%I::text) LIMIT $2',
        a.url_column, a.source_table, coalesce(a.owner_column, a.id_column), a.url_column,
        a.source_table, a.id_column)
    USING p_owner, p_limit;
END;
$$;

-- backfill_chunk with batch_mode: `listener backfill --batch` sends the jobs' OpenAI steps
-- to the Batch API (NULL leaves the choice to the daemon). It replaces the six-argument one.
DROP FUNCTION listener.backfill_chunk(text, text, integer, text, integer, integer);
CREATE FUNCTION listener.backfill_chunk(
    p_table text, p_after text, p_chunk integer, p_owner text, p_priority integer,
    p_max_attempts integer, p_batch boolean,
    OUT last_id text, OUT scanned integer, OUT enqueued integer
)
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments := listener.attachment(p_table);
BEGIN
    IF p_owner IS NOT NULL AND a.owner_column IS NULL THEN
        RAISE EXCEPTION 'table % was attached without --owner-column', a.source_table;
    END IF;
    EXECUTE format($q$
        WITH chunk AS (
            SELECT s.%1$I AS id, s.%2$I::text AS url, %3$s AS owner
            FROM %4$s AS s
            WHERE ($1::text IS NULL OR s.%1$I > $1::%5$s)
              AND ($3::text IS NULL OR s.%6$I::text = $3)
            ORDER BY s.%1$I
            LIMIT $2
        ), ins AS (
            INSERT INTO listener.jobs
                (source_table, source_id, image_url, owner_id, priority, max_attempts,
                 batch_mode)
            SELECT %7$L, c.id::text, c.url, c.owner, $4, $5, $6 FROM chunk AS c
            ON CONFLICT (source_table, source_id) DO NOTHING
            RETURNING 1
        )
        SELECT (SELECT c.id::text FROM chunk AS c ORDER BY c.id DESC LIMIT 1),
               (SELECT count(*) FROM chunk)::int,
               (SELECT count(*) FROM ins)::int
    $q$,
        a.id_column, a.url_column,
        CASE WHEN a.owner_column IS NULL THEN 'NULL::text'
             ELSE format('s.%I::text', a.owner_column) END,
        a.source_table, a.id_type, coalesce(a.owner_column, a.id_column), a.source_table)
    INTO last_id, scanned, enqueued
    USING p_after, p_chunk, p_owner, p_priority, p_max_attempts, p_batch;
    IF enqueued > 0 THEN
        PERFORM pg_notify('listener_jobs', '');
    END IF;
END;
$$;
