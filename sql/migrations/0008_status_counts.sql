-- 0008_status_counts: counts by status, table and owner kept incrementally, so `/status`, the
-- status page, `listener status` and `/metrics` read a few counter rows instead of counting
-- listener.jobs (four full scans per request before; 0.44 s at 200,000 jobs).
--
-- The hot paths (the attach triggers' inserts, the claim, completions) must not serialize on a
-- shared counter row, which would be a fleet-wide lock. So the writers only append:
--   * statement-level AFTER INSERT / UPDATE / DELETE triggers on listener.jobs (transition
--     tables, one statement per statement, as the status outbox in 0005) append the
--     statement's net change, grouped by (source_table, owner_id, status), to
--     listener.job_count_deltas: a heap without indexes, no conflicts, no row lock shared;
--   * listener.roll_up_job_counts() folds the deltas into listener.job_counts (per owner) and
--     listener.job_counts_by_table in one DELETE ... RETURNING statement; the daemon runs it
--     every few seconds and readers run it before reading, never waiting for each other.
-- Readers add the deltas not folded yet to the folded counts, in one statement (one
-- snapshot): the result is exact whether or not a rollup ran, since a job change and its
-- delta commit together and a rollup moves deltas into counts atomically.

CREATE TABLE listener.job_count_deltas (
    source_table text   COLLATE "C" NOT NULL,
    owner_id     text,
    status       text   NOT NULL,
    delta        bigint NOT NULL
);

-- Jobs per (table, owner, status). owner_id NULL (a table attached without an owner column)
-- is a key of its own: the unique index treats it as distinct from every text (PostgreSQL 13
-- has no NULLS NOT DISTINCT).
CREATE TABLE listener.job_counts (
    source_table text   COLLATE "C" NOT NULL,
    owner_id     text,
    status       text   NOT NULL,
    n            bigint NOT NULL
);
CREATE UNIQUE INDEX job_counts_key
    ON listener.job_counts (source_table, (coalesce(owner_id, '')), (owner_id IS NULL), status);
-- Owners with work left (the status page's "owners with the most work left"): a scan of
-- these rows only, however many owners have finished.
CREATE INDEX job_counts_left_idx ON listener.job_counts (source_table, owner_id)
    WHERE status IN ('pending', 'processing', 'batched') AND n > 0;
-- Owners with the most complete jobs fill that list when fewer have work left.
CREATE INDEX job_counts_complete_idx ON listener.job_counts (n DESC)
    WHERE status = 'complete' AND n > 0;

-- Jobs per (table, status): the totals, without adding up every owner.
CREATE TABLE listener.job_counts_by_table (
    source_table text   COLLATE "C" NOT NULL,
    status       text   NOT NULL,
    n            bigint NOT NULL,
    PRIMARY KEY (source_table, status)
);

-- Jobs finished per minute (status complete or failed), for the throughput chart and the rate:
-- counted as jobs reach those statuses, so reading the last hour is 60 rows per status
-- however fast jobs finish. A job finished twice (requeued) counts twice: work done.
CREATE TABLE listener.finish_deltas (
    minute timestamptz NOT NULL,
    status text        NOT NULL,
    n      bigint      NOT NULL
);
CREATE TABLE listener.finished_per_minute (
    minute timestamptz NOT NULL,
    status text        NOT NULL,
    n      bigint      NOT NULL,
    PRIMARY KEY (minute, status)
);

CREATE FUNCTION listener.count_inserted_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO listener.job_count_deltas (source_table, owner_id, status, delta)
    SELECT n.source_table, n.owner_id, n.status, count(*)
    FROM new_jobs AS n
    GROUP BY 1, 2, 3;
    RETURN NULL;
END;
$$;

-- Only rows whose key changed count: lease renewals, batch bookkeeping and the like append
-- nothing. A URL re-enqueue may change the owner as well as the status.
CREATE FUNCTION listener.count_updated_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- One statement, one join of the transition tables, for both kinds of delta: this runs
    -- for every claim, completion and lease renewal.
    WITH changed AS (
        SELECT o.source_table AS old_table, o.owner_id AS old_owner, o.status AS old_status,
               n.source_table, n.owner_id, n.status, n.finished_at
        FROM old_jobs AS o
        JOIN new_jobs AS n ON n.id = o.id
        WHERE o.status IS DISTINCT FROM n.status
           OR o.owner_id IS DISTINCT FROM n.owner_id
           OR o.source_table IS DISTINCT FROM n.source_table
    ), finished AS (
        INSERT INTO listener.finish_deltas (minute, status, n)
        SELECT date_trunc('minute', c.finished_at), c.status, count(*)
        FROM changed AS c
        WHERE c.status IN ('complete', 'failed') AND c.old_status IS DISTINCT FROM c.status
          AND c.finished_at IS NOT NULL
        GROUP BY 1, 2
    )
    INSERT INTO listener.job_count_deltas (source_table, owner_id, status, delta)
    SELECT k.source_table, k.owner_id, k.status, sum(k.delta)
    FROM changed AS c
    CROSS JOIN LATERAL (VALUES (c.old_table, c.old_owner, c.old_status, -1),
                               (c.source_table, c.owner_id, c.status, 1))
        AS k(source_table, owner_id, status, delta)
    GROUP BY 1, 2, 3
    HAVING sum(k.delta) <> 0;
    RETURN NULL;
END;
$$;

CREATE FUNCTION listener.count_deleted_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO listener.job_count_deltas (source_table, owner_id, status, delta)
    SELECT o.source_table, o.owner_id, o.status, -count(*)
    FROM old_jobs AS o
    GROUP BY 1, 2, 3;
    RETURN NULL;
END;
$$;

-- TRUNCATE holds listener.jobs exclusively: no job change is in flight, every count is 0.
CREATE FUNCTION listener.count_truncated_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM listener.job_count_deltas;
    DELETE FROM listener.job_counts;
    DELETE FROM listener.job_counts_by_table;
    DELETE FROM listener.finish_deltas;
    DELETE FROM listener.finished_per_minute;
    RETURN NULL;
END;
$$;

-- Spend, the same way: USD per (provider, UTC day of the result's created_at), so the status's
-- "spend today / in all" reads a row per provider and day instead of summing every result.
-- Only results that cost something append a delta (the free local provider appends nothing).
CREATE TABLE listener.spend_deltas (
    provider text    NOT NULL,
    day      date    NOT NULL,
    usd      numeric NOT NULL
);
CREATE TABLE listener.spend_by_day (
    provider text    NOT NULL,
    day      date    NOT NULL,
    usd      numeric NOT NULL,
    PRIMARY KEY (provider, day)
);

CREATE FUNCTION listener.count_inserted_spend() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO listener.spend_deltas (provider, day, usd)
    SELECT n.provider, (n.created_at AT TIME ZONE 'UTC')::date, sum(n.cost_usd)
    FROM new_results AS n
    WHERE n.cost_usd <> 0
    GROUP BY 1, 2;
    RETURN NULL;
END;
$$;

-- A result stored again adds its cost and moves to today (the upserts in queries.sql).
CREATE FUNCTION listener.count_updated_spend() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO listener.spend_deltas (provider, day, usd)
    SELECT k.provider, k.day, sum(k.usd)
    FROM old_results AS o
    JOIN new_results AS n ON n.job_id = o.job_id AND n.step = o.step
    CROSS JOIN LATERAL (
        VALUES (o.provider, (o.created_at AT TIME ZONE 'UTC')::date, -o.cost_usd),
               (n.provider, (n.created_at AT TIME ZONE 'UTC')::date, n.cost_usd)
    ) AS k(provider, day, usd)
    WHERE (o.cost_usd <> 0 OR n.cost_usd <> 0)
      AND (o.cost_usd, o.provider, o.created_at) IS DISTINCT FROM
          (n.cost_usd, n.provider, n.created_at)
    GROUP BY 1, 2
    HAVING sum(k.usd) <> 0;
    RETURN NULL;
END;
$$;

CREATE FUNCTION listener.count_deleted_spend() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO listener.spend_deltas (provider, day, usd)
    SELECT o.provider, (o.created_at AT TIME ZONE 'UTC')::date, -sum(o.cost_usd)
    FROM old_results AS o
    WHERE o.cost_usd <> 0
    GROUP BY 1, 2;
    RETURN NULL;
END;
$$;

CREATE FUNCTION listener.count_truncated_spend() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM listener.spend_deltas;
    DELETE FROM listener.spend_by_day;
    RETURN NULL;
END;
$$;

-- roll_up_job_counts(): folds every committed delta into the counts, in one statement, and
-- returns how many delta rows it folded; 0 without waiting when another rollup is running
-- (readers add the deltas left, so skipping costs nothing but a longer read). Rollups never
-- run at once (the advisory lock), so the upserts cannot deadlock each other, and nothing on
-- the hot path waits for a rollup: writers only append deltas.
CREATE FUNCTION listener.roll_up_job_counts() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    folded bigint;
BEGIN
    -- The key: the bytes of "lstncnts".
    IF NOT pg_try_advisory_xact_lock(7814717795881350259) THEN
        RETURN 0;
    END IF;
    WITH moved AS (
        DELETE FROM listener.job_count_deltas
        RETURNING source_table, owner_id, status, delta
    ), per_owner AS (
        INSERT INTO listener.job_counts AS c (source_table, owner_id, status, n)
        SELECT m.source_table, m.owner_id, m.status, sum(m.delta)
        FROM moved AS m
        GROUP BY 1, 2, 3
        HAVING sum(m.delta) <> 0
        ON CONFLICT (source_table, (coalesce(owner_id, '')), (owner_id IS NULL), status)
        DO UPDATE SET n = c.n + EXCLUDED.n
    ), per_table AS (
        INSERT INTO listener.job_counts_by_table AS t (source_table, status, n)
        SELECT m.source_table, m.status, sum(m.delta)
        FROM moved AS m
        GROUP BY 1, 2
        HAVING sum(m.delta) <> 0
        ON CONFLICT (source_table, status) DO UPDATE SET n = t.n + EXCLUDED.n
    )
    -- Data-modifying CTEs run to completion whether or not they are read.
    SELECT count(*) INTO folded FROM moved;
    WITH moved AS (
        DELETE FROM listener.spend_deltas RETURNING provider, day, usd
    ), per_day AS (
        INSERT INTO listener.spend_by_day AS s (provider, day, usd)
        SELECT m.provider, m.day, sum(m.usd) FROM moved AS m GROUP BY 1, 2
        ON CONFLICT (provider, day) DO UPDATE SET usd = s.usd + EXCLUDED.usd
    )
    SELECT folded + count(*) INTO folded FROM moved;
    WITH moved AS (
        DELETE FROM listener.finish_deltas RETURNING minute, status, n
    ), per_minute AS (
        INSERT INTO listener.finished_per_minute AS f (minute, status, n)
        SELECT m.minute, m.status, sum(m.n) FROM moved AS m GROUP BY 1, 2
        ON CONFLICT (minute, status) DO UPDATE SET n = f.n + EXCLUDED.n
    )
    SELECT folded + count(*) INTO folded FROM moved;
    -- Only the last hour is read: keep two.
    DELETE FROM listener.finished_per_minute WHERE minute < now() - interval '2 hours';
    RETURN folded;
END;
$$;

-- The triggers first: CREATE TRIGGER locks listener.jobs against writes until this migration
-- commits, so the counts taken below see every job, and every later change has a delta.
CREATE TRIGGER jobs_count_insert
    AFTER INSERT ON listener.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_inserted_jobs();
CREATE TRIGGER jobs_count_update
    AFTER UPDATE ON listener.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_updated_jobs();
CREATE TRIGGER jobs_count_delete
    AFTER DELETE ON listener.jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_deleted_jobs();
CREATE TRIGGER jobs_count_truncate
    AFTER TRUNCATE ON listener.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_truncated_jobs();
CREATE TRIGGER results_spend_insert
    AFTER INSERT ON listener.results
    REFERENCING NEW TABLE AS new_results
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_inserted_spend();
CREATE TRIGGER results_spend_update
    AFTER UPDATE ON listener.results
    REFERENCING OLD TABLE AS old_results NEW TABLE AS new_results
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_updated_spend();
CREATE TRIGGER results_spend_delete
    AFTER DELETE ON listener.results
    REFERENCING OLD TABLE AS old_results
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_deleted_spend();
CREATE TRIGGER results_spend_truncate
    AFTER TRUNCATE ON listener.results
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_truncated_spend();

INSERT INTO listener.job_counts (source_table, owner_id, status, n)
SELECT source_table, owner_id, status, count(*) FROM listener.jobs GROUP BY 1, 2, 3;
INSERT INTO listener.job_counts_by_table (source_table, status, n)
SELECT source_table, status, count(*) FROM listener.jobs GROUP BY 1, 2;
INSERT INTO listener.finished_per_minute (minute, status, n)
SELECT date_trunc('minute', finished_at), status, count(*)
FROM listener.jobs
WHERE status IN ('complete', 'failed') AND finished_at >= now() - interval '2 hours'
GROUP BY 1, 2;
INSERT INTO listener.spend_by_day (provider, day, usd)
SELECT provider, (created_at AT TIME ZONE 'UTC')::date, sum(cost_usd)
FROM listener.results WHERE cost_usd <> 0 GROUP BY 1, 2;

-- oldest_pending_s(): seconds the longest-waiting runnable pending job has waited, i.e.
-- now - its run_after (a new job's run_after is its insert time; a retry's, the end of its
-- backoff); 0 when none is runnable. Read from jobs_claim_idx (priority, run_after, id): the
-- first entry of each priority, found by a skip scan over the few priorities in use, so it
-- costs O(priorities), not O(pending jobs) as min(created_at) did.
CREATE FUNCTION listener.oldest_pending_s() RETURNS double precision
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE priorities AS (
        (SELECT priority FROM listener.jobs WHERE status = 'pending' ORDER BY priority LIMIT 1)
        UNION ALL
        SELECT (SELECT j.priority FROM listener.jobs AS j
                WHERE j.status = 'pending' AND j.priority > p.priority
                ORDER BY j.priority LIMIT 1)
        FROM priorities AS p
        WHERE p.priority IS NOT NULL
    )
    SELECT greatest(coalesce(extract(epoch FROM now() - min(f.run_after)), 0), 0)::float8
    FROM priorities AS p
    CROSS JOIN LATERAL (
        SELECT j.run_after FROM listener.jobs AS j
        WHERE j.status = 'pending' AND j.priority = p.priority
        ORDER BY j.run_after
        LIMIT 1
    ) AS f
    WHERE p.priority IS NOT NULL
$$;
