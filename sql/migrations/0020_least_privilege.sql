-- 0020_least_privilege: listener's SQL is safe beside hostile tenants.
--
-- listener runs inside the app's database, where every role that may INSERT into an attached
-- table fires its triggers, and (on Supabase) every signed-in user is one such role. Until now
-- the schema and its SECURITY DEFINER functions belonged to the role that migrated (often a
-- superuser), functions were executable by PUBLIC, the insert trigger had no SET search_path,
-- and advisory locks anyone may take serialized admission. From this migration on:
--
--   * Two roles of its own, without LOGIN, SUPERUSER, CREATEDB, CREATEROLE, REPLICATION or
--     BYPASSRLS:
--       listener_owner   owns the schema and every object in it, so SECURITY DEFINER
--                        functions run with its rights: listener's tables, and SELECT on the
--                        id, URL and owner columns of attached tables (attach grants them);
--       listener_worker  the rights a daemon needs: listener's tables and functions, SELECT
--                        on the attached columns and UPDATE on the write-back columns. A
--                        daemon logs in as a role of its own that is a member of it
--                        (README, Security).
--     `listener migrate` creates them when missing (it needs CREATEROLE once) and makes the
--     migrating role a member of listener_owner; apply_privileges() (below) gives every
--     object of the schema to listener_owner and sets the grants, after every migration run
--     and every attach.
--   * Every function of the schema has SET search_path = pg_catalog, pg_temp (pg_temp last:
--     a caller's temporary types and tables can shadow nothing; functions and operators are
--     never looked up there), except the few invoker functions that resolve a table name the
--     caller typed in the caller's own search_path (attach, detach, attachment and the
--     backfill helpers). Names outside pg_catalog are schema-qualified, type names stored by
--     attach included (format_type under this search_path: public.my_id, not my_id).
--   * EXECUTE is revoked from PUBLIC on every function; trigger functions are executable by
--     their owner only (no one else can bind them to a table), and each checks TG_RELID: it
--     raises when it fires on any table but the one it was written or generated for.
--   * No advisory locks: admission and the claim of deleted rows meet on a table lock of
--     listener.admission_lock, the rollups and the per-owner faces lock on rows of
--     listener.locks. Neither can be taken by a role without rights on them, so no one can
--     stall admission by holding a key.
--   * NOTIFY listener_events carries no row id unless event_settings.notify_row_ids is set:
--     any role that can connect may LISTEN on any channel.
--   * listener.reanalyze (the function apps call) counts rows per owner and day against
--     listener.reanalyze_limits; listener.reanalyze_rows (the operator's, no quota) does the
--     work.
--   * attach is one function again (attach_table, below), replacing the chain of wrappers
--     0005-0019 had grown; the generated functions are written once per attach.

-- ---------------------------------------------------------------------------------------
-- Roles
-- ---------------------------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'listener_owner') THEN
        CREATE ROLE listener_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
            NOREPLICATION NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'listener_worker') THEN
        CREATE ROLE listener_worker NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
            NOREPLICATION NOBYPASSRLS;
    END IF;
    -- The migrating role hands objects to listener_owner and later replaces them: it must be
    -- a member (a superuser is a member of every role already).
    IF NOT pg_catalog.pg_has_role(current_user, 'listener_owner', 'MEMBER') THEN
        EXECUTE pg_catalog.format('GRANT listener_owner TO %I', current_user);
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------------------
-- Locks no tenant can take
-- ---------------------------------------------------------------------------------------

-- Admissions (admit_entries) hold it in ROW SHARE mode while they read app rows and insert
-- jobs; the claim of deleted rows (claim_deleted_rows) takes it in EXCLUSIVE mode, so it sees
-- every admission that read a row before the row's delete committed. LOCK TABLE needs rights
-- on the table; ACCESS SHARE, the one lock any role can take on any table by its oid, does not
-- conflict with EXCLUSIVE.
CREATE TABLE listener.admission_lock ();

-- One row per lock: the rollups' try-locks ('job_counts', 'face_review_counts',
-- 'dedup_savings', FOR UPDATE SKIP LOCKED) and the per-owner faces lock ('faces:...', made on
-- first use). Locking a row needs UPDATE on the table.
CREATE TABLE listener.locks (
    name text COLLATE "C" PRIMARY KEY
);
INSERT INTO listener.locks (name) VALUES
    ('job_counts'), ('face_review_counts'), ('dedup_savings');

-- ---------------------------------------------------------------------------------------
-- Trigger functions of listener's own tables, each checking the table it fires on
-- ---------------------------------------------------------------------------------------

-- Counts (0008): statement triggers on listener.jobs and listener.results append deltas.
CREATE OR REPLACE FUNCTION listener.count_inserted_jobs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.count_inserted_jobs() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.job_count_deltas (source_table, owner_id, status, delta)
    SELECT n.source_table, n.owner_id, n.status, count(*)
    FROM new_jobs AS n
    GROUP BY 1, 2, 3;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.count_updated_jobs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.count_updated_jobs() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
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

CREATE OR REPLACE FUNCTION listener.count_deleted_jobs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.count_deleted_jobs() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.job_count_deltas (source_table, owner_id, status, delta)
    SELECT o.source_table, o.owner_id, o.status, -count(*)
    FROM old_jobs AS o
    GROUP BY 1, 2, 3;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.count_truncated_jobs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.count_truncated_jobs() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    DELETE FROM listener.job_count_deltas;
    DELETE FROM listener.job_counts;
    DELETE FROM listener.job_counts_by_table;
    DELETE FROM listener.finish_deltas;
    DELETE FROM listener.finished_per_minute;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.count_inserted_spend() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.results'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.count_inserted_spend() fires on listener.results only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.spend_deltas (provider, day, usd)
    SELECT n.provider, (n.created_at AT TIME ZONE 'UTC')::date, sum(n.cost_usd)
    FROM new_results AS n
    WHERE n.cost_usd <> 0
    GROUP BY 1, 2;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.count_updated_spend() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.results'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.count_updated_spend() fires on listener.results only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
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

CREATE OR REPLACE FUNCTION listener.count_deleted_spend() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.results'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.count_deleted_spend() fires on listener.results only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.spend_deltas (provider, day, usd)
    SELECT o.provider, (o.created_at AT TIME ZONE 'UTC')::date, -sum(o.cost_usd)
    FROM old_results AS o
    WHERE o.cost_usd <> 0
    GROUP BY 1, 2;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.count_truncated_spend() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.results'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.count_truncated_spend() fires on listener.results only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    DELETE FROM listener.spend_deltas;
    DELETE FROM listener.spend_by_day;
    RETURN NULL;
END;
$$;

-- Open suggestions per owner (0015).
CREATE OR REPLACE FUNCTION listener.count_inserted_suggestions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.face_suggestions'::pg_catalog.regclass THEN
        RAISE EXCEPTION
            'listener.count_inserted_suggestions() fires on listener.face_suggestions only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.face_review_deltas (owner_id, delta)
    SELECT n.owner_id, count(*) FROM new_rows AS n WHERE n.status = 'open' GROUP BY 1;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.count_updated_suggestions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.face_suggestions'::pg_catalog.regclass THEN
        RAISE EXCEPTION
            'listener.count_updated_suggestions() fires on listener.face_suggestions only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.face_review_deltas (owner_id, delta)
    SELECT x.owner_id, sum(x.d)
    FROM (SELECT o.owner_id, -1 AS d FROM old_rows AS o WHERE o.status = 'open'
          UNION ALL
          SELECT n.owner_id, 1 FROM new_rows AS n WHERE n.status = 'open') AS x
    GROUP BY 1
    HAVING sum(x.d) <> 0;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.count_deleted_suggestions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.face_suggestions'::pg_catalog.regclass THEN
        RAISE EXCEPTION
            'listener.count_deleted_suggestions() fires on listener.face_suggestions only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.face_review_deltas (owner_id, delta)
    SELECT o.owner_id, -count(*) FROM old_rows AS o WHERE o.status = 'open' GROUP BY 1;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.count_truncated_suggestions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.face_suggestions'::pg_catalog.regclass THEN
        RAISE EXCEPTION
            'listener.count_truncated_suggestions() fires on listener.face_suggestions only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    DELETE FROM listener.face_review_deltas;
    DELETE FROM listener.face_review_counts;
    RETURN NULL;
END;
$$;

-- The status outbox (0005, 0011).
CREATE OR REPLACE FUNCTION listener.queue_status_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.queue_status_inserted() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.status_outbox (job_id)
    SELECT n.id FROM new_jobs AS n
    WHERE n.source_table IN (
        SELECT a.source_table FROM listener.attachments AS a
        WHERE a.status_column IS NOT NULL OR a.result_column IS NOT NULL
           OR a.error_column IS NOT NULL OR a.analyzed_at_column IS NOT NULL)
    ORDER BY n.id
    ON CONFLICT (job_id) DO UPDATE SET job_id = EXCLUDED.job_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.queue_status_updated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.queue_status_updated() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.status_outbox (job_id)
    SELECT n.id
    FROM new_jobs AS n
    JOIN old_jobs AS o ON o.id = n.id
    JOIN listener.attachments AS a ON a.source_table = n.source_table
    WHERE (n.status IS DISTINCT FROM o.status
           AND (a.status_column IS NOT NULL OR a.result_column IS NOT NULL
                OR a.error_column IS NOT NULL OR a.analyzed_at_column IS NOT NULL))
       OR (n.last_error IS DISTINCT FROM o.last_error AND a.error_column IS NOT NULL)
    ORDER BY n.id
    ON CONFLICT (job_id) DO UPDATE SET job_id = EXCLUDED.job_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.queue_results_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.results'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.queue_results_changed() fires on listener.results only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO listener.status_outbox (job_id)
    SELECT DISTINCT n.job_id
    FROM new_results AS n
    JOIN listener.jobs AS j ON j.id = n.job_id
    WHERE j.source_table IN (
        SELECT a.source_table FROM listener.attachments AS a WHERE a.result_column IS NOT NULL)
    ORDER BY n.job_id
    ON CONFLICT (job_id) DO UPDATE SET job_id = EXCLUDED.job_id;
    RETURN NULL;
END;
$$;

-- A new image (0002, 0006): the job's results and batch no longer apply.
CREATE OR REPLACE FUNCTION listener.forget_results_on_reset() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.forget_results_on_reset() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    DELETE FROM listener.results WHERE job_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener.leave_batch_on_new_image() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.leave_batch_on_new_image() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    NEW.batch_id := NULL;
    NEW.batch_step := NULL;
    RETURN NEW;
END;
$$;

-- The insert trigger no longer writes jobs (0019), so nothing sets listener.enqueue_counts
-- (0017) any more: every insert of jobs is counted by this trigger.
DROP TRIGGER jobs_count_insert ON listener.jobs;
CREATE TRIGGER jobs_count_insert
    AFTER INSERT ON listener.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_inserted_jobs();

-- ---------------------------------------------------------------------------------------
-- Events (0010): NOTIFY carries no row id unless told
-- ---------------------------------------------------------------------------------------

-- notify_row_ids: whether NOTIFY listener_events carries the row id. Postgres has no
-- privilege for LISTEN: every role that can connect hears every channel, so by default the
-- payload names only the table, the job and its status ({"table", "status", "job_id"}); a
-- backend that may read listener.jobs looks the row up. Set it where every role that can
-- connect may see every row id. Webhooks (a receiver the operator chose) always carry it.
ALTER TABLE listener.event_settings
    ADD COLUMN notify_row_ids boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION listener.emit_terminal_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    settings listener.event_settings;
    sent integer;
BEGIN
    IF TG_RELID <> 'listener.jobs'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'listener.emit_terminal_events() fires on listener.jobs only'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM new_jobs AS n WHERE n.status IN ('complete', 'failed', 'cancelled')
    ) THEN
        RETURN NULL;
    END IF;
    SELECT * INTO settings FROM listener.event_settings AS s;

    WITH events AS MATERIALIZED (
        SELECT n.id, n.source_table, n.status, jsonb_build_object(
                   'table', n.source_table, 'row_id', n.source_id,
                   'status', n.status, 'job_id', n.id) AS event
        FROM new_jobs AS n JOIN old_jobs AS o ON o.id = n.id
        WHERE n.status IN ('complete', 'failed', 'cancelled')
          AND o.status IS DISTINCT FROM n.status
    ), queued AS (
        INSERT INTO listener.event_outbox (event)
        SELECT e.event FROM events AS e
        WHERE settings.webhooks
        ORDER BY e.id
    )
    SELECT count(pg_notify('listener_events', CASE
               WHEN NOT settings.notify_row_ids THEN
                   jsonb_build_object('table', e.source_table, 'status', e.status,
                                      'job_id', e.id)::text
               WHEN octet_length(e.event::text) < 7900 THEN e.event::text
               ELSE (e.event || '{"row_id": null, "row_id_too_long": true}')::text END))
    INTO sent
    FROM (SELECT * FROM events ORDER BY id) AS e;
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------
-- Rollups and the faces lock without advisory locks
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION listener.roll_up_job_counts() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    folded bigint;
BEGIN
    -- One rollup at a time (the upserts cannot deadlock each other); a second one returns 0
    -- at once: readers add the deltas left, so skipping costs only a longer read.
    PERFORM 1 FROM listener.locks AS l WHERE l.name = 'job_counts' FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
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
    DELETE FROM listener.finished_per_minute WHERE minute < now() - interval '2 hours';
    RETURN folded;
END;
$$;

CREATE OR REPLACE FUNCTION listener.roll_up_face_review_counts() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    folded bigint;
BEGIN
    PERFORM 1 FROM listener.locks AS l
    WHERE l.name = 'face_review_counts' FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    WITH moved AS (
        DELETE FROM listener.face_review_deltas RETURNING owner_id, delta
    ), folded AS (
        INSERT INTO listener.face_review_counts AS c (owner_id, n)
        SELECT m.owner_id, sum(m.delta) FROM moved AS m
        GROUP BY 1
        HAVING sum(m.delta) <> 0
        ON CONFLICT ((coalesce(owner_id, '')), (owner_id IS NULL))
        DO UPDATE SET n = c.n + EXCLUDED.n
    )
    SELECT count(*) INTO folded FROM moved;
    IF folded > 0 THEN
        DELETE FROM listener.face_review_counts WHERE n = 0;
    END IF;
    RETURN folded;
END;
$$;

CREATE OR REPLACE FUNCTION listener.roll_up_dedup_savings() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    folded bigint;
BEGIN
    PERFORM 1 FROM listener.locks AS l WHERE l.name = 'dedup_savings' FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    WITH moved AS (
        DELETE FROM listener.dedup_deltas RETURNING provider, day, steps, usd
    ), per_day AS (
        INSERT INTO listener.dedup_by_day AS s (provider, day, steps, usd)
        SELECT m.provider, m.day, sum(m.steps), sum(m.usd) FROM moved AS m GROUP BY 1, 2
        ON CONFLICT (provider, day)
        DO UPDATE SET steps = s.steps + EXCLUDED.steps, usd = s.usd + EXCLUDED.usd
    )
    SELECT count(*) INTO folded FROM moved;
    RETURN folded;
END;
$$;

-- lock_owner_faces(owner): as in 0015 (no one else changes which person any face of the owner
-- belongs to until the end of the transaction), on the owner's row of listener.locks, made on
-- first use. NULL (rows without an owner) is an owner of its own.
CREATE OR REPLACE FUNCTION listener.lock_owner_faces(p_owner text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key text := CASE WHEN p_owner IS NULL THEN 'faces' ELSE 'faces:' || p_owner END;
BEGIN
    INSERT INTO listener.locks (name) VALUES (key) ON CONFLICT (name) DO NOTHING;
    PERFORM 1 FROM listener.locks AS l WHERE l.name = key FOR UPDATE;
END;
$$;

-- ---------------------------------------------------------------------------------------
-- Admission (0019) and the claim of deleted rows, on listener.admission_lock
-- ---------------------------------------------------------------------------------------

-- admit_entries: as in 0019 (see there), with the table lock in place of the advisory lock.
CREATE OR REPLACE FUNCTION listener.admit_entries(
    p_limit integer, p_room integer, p_worker text, p_lease_s double precision, p_token uuid,
    p_max_attempts integer, OUT taken bigint, OUT admitted bigint, OUT claimed bigint[]
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    ids bigint[];
    tables text[];
    keys text[];
    a record;
    r record;
BEGIN
    taken := 0;
    admitted := 0;
    claimed := '{}';
    WITH taken AS (
        DELETE FROM listener.inserted_rows AS i
        WHERE i.id = ANY(ARRAY(
            SELECT x.id FROM listener.inserted_rows AS x
            ORDER BY x.id LIMIT p_limit
            FOR UPDATE SKIP LOCKED))
        RETURNING i.id, i.source_table, i.source_id
    )
    SELECT array_agg(t.id), array_agg(t.source_table), array_agg(t.source_id)
    INTO ids, tables, keys
    FROM taken AS t;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    -- Held until commit, before any row is read: claim_deleted_rows() waits for it.
    LOCK TABLE listener.admission_lock IN ROW SHARE MODE;
    taken := cardinality(ids);
    FOR a IN
        SELECT x.source_table, x.table_oid, e.ids, e.keys
        FROM listener.attachments AS x
        CROSS JOIN LATERAL (
            SELECT array_agg(d.id) AS ids, array_agg(d.source_id) AS keys
            FROM (SELECT DISTINCT ON (u.source_id) u.id, u.source_id
                  FROM unnest(ids, tables, keys) AS u(id, source_table, source_id)
                  WHERE u.source_table = x.source_table
                  ORDER BY u.source_id, u.id DESC) AS d
        ) AS e
        WHERE x.source_table = ANY(tables)
        ORDER BY x.source_table
    LOOP
        BEGIN
            EXECUTE format('SELECT * FROM listener.%I($1, $2, $3, $4, $5, $6, $7)',
                           'admit_' || a.table_oid)
            INTO r
            USING a.ids, a.keys, greatest(p_room - cardinality(claimed), 0), p_worker,
                  p_lease_s, p_token, p_max_attempts;
            admitted := admitted + r.made;
            claimed := claimed || r.claimed;
        EXCEPTION WHEN OTHERS THEN
            IF to_regclass(a.source_table) IS NOT NULL THEN
                INSERT INTO listener.inserted_rows (id, source_table, source_id)
                SELECT u.id, u.source_table, u.source_id
                FROM unnest(ids, tables, keys) AS u(id, source_table, source_id)
                WHERE u.source_table = a.source_table;
            END IF;
            RAISE WARNING 'rows inserted into % not admitted: %', a.source_table, SQLERRM;
        END;
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION listener.claim_deleted_rows(p_limit integer, p_lease_s double precision)
RETURNS TABLE (
    id bigint, source_table text, source_id text, job_id bigint, reinserted boolean,
    attempts integer
)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    LOCK TABLE listener.admission_lock IN EXCLUSIVE MODE;
    RETURN QUERY
    WITH due AS (
        SELECT x.id FROM listener.deleted_rows AS x
        WHERE x.next_attempt_at <= now()
        ORDER BY x.next_attempt_at, x.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE listener.deleted_rows AS d
    SET attempts = d.attempts + 1,
        next_attempt_at = now() + make_interval(secs => p_lease_s),
        job_id = CASE WHEN d.job_id IS NULL AND NOT d.reinserted
                      THEN listener.job_of_deleted_row(d.source_table, d.source_id)
                      ELSE d.job_id END
    FROM due
    WHERE d.id = due.id
    RETURNING d.id, d.source_table::text, d.source_id::text, d.job_id, d.reinserted, d.attempts;
END;
$$;

-- ---------------------------------------------------------------------------------------
-- Re-analysis: per-owner quota for the app, none for the operator
-- ---------------------------------------------------------------------------------------

-- per_owner_per_day: rows one owner may re-analyze through listener.reanalyze per UTC day;
-- NULL: no limit. Bounds what one tenant can spend of the daily budget of all.
CREATE TABLE listener.reanalyze_limits (
    singleton         boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    per_owner_per_day integer     CHECK (per_owner_per_day >= 0),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
INSERT INTO listener.reanalyze_limits (per_owner_per_day) VALUES (1000);

-- Rows re-analyzed per owner (NULL: rows without one) and UTC day. Days before today are
-- deleted by the next call.
CREATE TABLE listener.reanalyze_usage (
    owner_id text COLLATE "C",
    day      date    NOT NULL,
    n        integer NOT NULL
);
CREATE UNIQUE INDEX reanalyze_usage_key
    ON listener.reanalyze_usage (day, (coalesce(owner_id, '')), (owner_id IS NULL));

-- reanalyze_rows(table, ids, priority): 0009's reanalyze, for the operator (`listener
-- reanalyze`) and the daemon's store: no quota. Invoker rights.
CREATE FUNCTION listener.reanalyze_rows(
    p_table regclass, p_ids text[], p_priority integer DEFAULT 0
) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a listener.attachments;
    reset integer;
    created integer;
BEGIN
    SELECT * INTO a FROM listener.attachments AS x WHERE x.table_oid = p_table::oid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not attached', p_table
            USING ERRCODE = 'undefined_object',
                  HINT = 'Run: listener attach TABLE --id-column ID --url-column URL';
    END IF;
    IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
        RETURN 0;
    END IF;
    IF cardinality(p_ids) > 100000 THEN
        RAISE EXCEPTION 'at most 100,000 rows per call (got %)', cardinality(p_ids)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;

    WITH restarted AS (
        UPDATE listener.jobs AS j
        SET status = 'pending', attempts = 0, run_after = now(), priority = p_priority,
            last_error = NULL, lease_token = NULL, lease_expires_at = NULL, worker_id = NULL,
            batch_id = NULL, batch_step = NULL, started_at = NULL, finished_at = NULL,
            updated_at = now()
        WHERE j.source_table = a.source_table AND j.source_id = ANY(p_ids)
        RETURNING j.id
    ), forgotten AS (
        DELETE FROM listener.results AS r USING restarted WHERE r.job_id = restarted.id
    )
    SELECT count(*) INTO reset FROM restarted;

    EXECUTE format(
        'INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id, priority) '
        'SELECT %L, s.%I::text, s.%I::text, %s, $2 FROM %s AS s '
        'WHERE s.%I = ANY($1::%s[]) '
        'ON CONFLICT (source_table, source_id) DO NOTHING',
        a.source_table, a.id_column, a.url_column,
        CASE WHEN a.owner_column IS NULL THEN 'NULL::text'
             ELSE format('s.%I::text', a.owner_column) END,
        a.source_table, a.id_column, a.id_type)
    USING p_ids, p_priority;
    GET DIAGNOSTICS created = ROW_COUNT;

    IF reset + created > 0 THEN
        PERFORM pg_notify('listener_jobs', '');
    END IF;
    RETURN reset + created;
END;
$$;

-- reanalyze(table, ids, priority): what apps call (0009), now with a quota: the rows of ids
-- that exist in the table are counted per owner (the owner column's value) against
-- reanalyze_limits.per_owner_per_day for today (UTC). A call that would take any owner past
-- it changes nothing and raises program_limit_exceeded (54000), naming the owner, what is
-- left and the limit. Then reanalyze_rows(). SECURITY DEFINER: the app needs EXECUTE on this
-- function only (README, Security).
CREATE OR REPLACE FUNCTION listener.reanalyze(
    p_table regclass, p_ids text[], p_priority integer DEFAULT 0
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a listener.attachments;
    quota integer;
    today date := (now() AT TIME ZONE 'UTC')::date;
    over_owner text;
    over_used integer;
    over_asked integer;
BEGIN
    SELECT * INTO a FROM listener.attachments AS x WHERE x.table_oid = p_table::oid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not attached', p_table
            USING ERRCODE = 'undefined_object',
                  HINT = 'Run: listener attach TABLE --id-column ID --url-column URL';
    END IF;
    IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
        RETURN 0;
    END IF;
    IF cardinality(p_ids) > 100000 THEN
        RAISE EXCEPTION 'at most 100,000 rows per call (got %)', cardinality(p_ids)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    SELECT l.per_owner_per_day INTO quota FROM listener.reanalyze_limits AS l;
    IF quota IS NOT NULL THEN
        DELETE FROM listener.reanalyze_usage AS u WHERE u.day < today;
        -- Upserts lock each owner's row until commit: concurrent calls of one owner count
        -- one after the other.
        EXECUTE format($q$
            WITH asked AS (
                SELECT %1$s AS owner_id, count(*)::integer AS n
                FROM %2$s AS s WHERE s.%3$I = ANY($1::%4$s[])
                GROUP BY 1
            ), counted AS (
                INSERT INTO listener.reanalyze_usage AS u (owner_id, day, n)
                SELECT k.owner_id, $2, k.n FROM asked AS k
                ORDER BY k.owner_id
                ON CONFLICT (day, (coalesce(owner_id, '')), (owner_id IS NULL))
                DO UPDATE SET n = u.n + EXCLUDED.n
                RETURNING u.owner_id, u.n
            )
            SELECT c.owner_id, c.n, k.n AS asked FROM counted AS c
            JOIN asked AS k ON k.owner_id IS NOT DISTINCT FROM c.owner_id
            WHERE c.n > $3
            ORDER BY c.owner_id
            LIMIT 1
        $q$,
            CASE WHEN a.owner_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', a.owner_column) END,
            a.source_table, a.id_column, a.id_type)
        INTO over_owner, over_used, over_asked USING p_ids, today, quota;
        IF over_used IS NOT NULL THEN
            RAISE EXCEPTION 're-analysis quota of owner % is used: % of % rows today, % asked',
                coalesce(quote_literal(over_owner), 'NULL'), over_used - over_asked, quota,
                over_asked
                USING ERRCODE = 'program_limit_exceeded',
                      HINT = 'The quota resets at 00:00 UTC; an operator sets it in '
                             'listener.reanalyze_limits.per_owner_per_day.';
        END IF;
    END IF;
    RETURN listener.reanalyze_rows(p_table, p_ids, p_priority);
END;
$$;

-- ---------------------------------------------------------------------------------------
-- Attach, in one place
-- ---------------------------------------------------------------------------------------

-- detach_table(table): what attach_table installs goes: the triggers on the table, the
-- generated functions, listener's policy and grants on it, the attachment. Jobs and results
-- stay. False when the table was not attached. Entries it still has in inserted_rows are
-- dropped by the next admission.
CREATE FUNCTION listener.detach_table(p_oid oid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a listener.attachments;
    present boolean;
BEGIN
    SELECT * INTO a FROM listener.attachments AS x WHERE x.table_oid = p_oid;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    present := EXISTS (SELECT FROM pg_class AS c WHERE c.oid = p_oid);
    IF present THEN
        EXECUTE format('DROP TRIGGER IF EXISTS listener_enqueue_insert ON %s', p_oid::regclass);
        EXECUTE format('DROP TRIGGER IF EXISTS listener_enqueue_update ON %s', p_oid::regclass);
        EXECUTE format('DROP TRIGGER IF EXISTS listener_forget_delete ON %s', p_oid::regclass);
        EXECUTE format('DROP POLICY IF EXISTS listener_access ON %s', p_oid::regclass);
        EXECUTE format('REVOKE ALL ON TABLE %s FROM listener_owner, listener_worker',
                       p_oid::regclass);
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I()', 'enqueue_insert_' || p_oid);
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I()', 'enqueue_update_' || p_oid);
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I()', 'forget_delete_' || p_oid);
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I(bigint[], text[], integer, text, '
                   'double precision, uuid, integer)', 'admit_' || p_oid);
    DELETE FROM listener.attachments AS x WHERE x.table_oid = p_oid;
    PERFORM listener.sync_write_back_triggers();
    RETURN true;
END;
$$;

-- attach_table(table, id, url, owner, status, result, error, analyzed_at): attaches `table`
-- (its oid: the caller resolved the name), replacing any previous attachment of it. Checks
-- first, and names the problem: not one of listener's tables, a table; every column exists;
-- the write-back columns are none of the id, URL and owner columns nor each other, are not
-- generated, and hold what listener writes (status: text, citext or varchar(10+); result:
-- jsonb; error: text, citext or varchar(200+); analyzed_at: timestamptz or timestamp). Then:
--   * the generated functions, each SECURITY DEFINER (owned by listener_owner) only where the
--     app's own writes fire it, SET search_path = pg_catalog, pg_temp, checking TG_RELID (the
--     table, or for a partitioned table one of its partitions, where row triggers fire; the
--     partition lookup runs only when TG_RELID is another table's):
--       enqueue_insert_<oid>: appends (table, id) of a statement's new rows to
--           listener.inserted_rows, then one NOTIFY (0019);
--       enqueue_update_<oid>: a changed URL starts the row's job over (0001);
--       forget_delete_<oid>: appends deleted rows to listener.deleted_rows, then one NOTIFY
--           (0014);
--       admit_<oid>: the table's admission, one statement (0019; see admit_entries);
--   * the triggers that fire them;
--   * grants on the table: SELECT of the id, URL and owner columns to listener_owner (the
--     admission and re-analysis read them), SELECT of those and UPDATE of the write-back
--     columns to listener_worker (the daemon's write-back), USAGE on the table's schema to
--     both when PUBLIC lacks it (it stays after a detach), and a row-level security policy
--     listener_access for those two roles (USING true), so row-level security on the table,
--     now or later, hides no row from them. Nothing else of the table is granted.
-- Needs: ownership of the table (policy, grants) and membership in listener_owner.
CREATE FUNCTION listener.attach_table(
    p_table regclass, p_id_column text, p_url_column text, p_owner_column text,
    p_status_column text, p_result_column text, p_error_column text,
    p_analyzed_at_column text
) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel oid := p_table::oid;
    qualified text;
    schema_name name;
    id_type text;
    role text;
    col text;
    other text;
    st record;
    others text[];
    created timestamptz;
    read_cols text;
    write_cols text;
BEGIN
    SELECT format('%I.%I', n.nspname, c.relname), n.nspname INTO qualified, schema_name
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE c.oid = rel AND c.relkind IN ('r', 'p');
    IF qualified IS NULL THEN
        RAISE EXCEPTION '% is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;
    -- What attach needs, said before anything is tried.
    IF NOT pg_has_role(current_user, 'listener_owner', 'USAGE') THEN
        RAISE EXCEPTION 'attach needs the rights of listener_owner, which % lacks', current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Run it as the role that ran listener migrate, or: GRANT '
                         'listener_owner TO ' || quote_ident(current_user) || ';';
    END IF;
    IF NOT pg_has_role(current_user, (SELECT c.relowner FROM pg_class AS c WHERE c.oid = rel),
                       'USAGE') THEN
        RAISE EXCEPTION 'attach needs the ownership of % (for its grants and policy), which % '
                        'lacks', qualified, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Run it as the table''s owner, '
                         || quote_ident(pg_get_userbyid(
                                (SELECT c.relowner FROM pg_class AS c WHERE c.oid = rel)))
                         || ', or a member of it.';
    END IF;
    IF schema_name = 'listener' THEN
        RAISE EXCEPTION '% is one of listener''s own tables: attach the table your app inserts '
                        'image rows into', qualified
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH col IN ARRAY ARRAY[p_id_column, p_url_column, p_owner_column, p_status_column,
                               p_result_column, p_error_column, p_analyzed_at_column] LOOP
        IF col IS NOT NULL AND NOT EXISTS (
            SELECT FROM pg_attribute AS x
            WHERE x.attrelid = rel AND x.attname = col AND x.attnum > 0 AND NOT x.attisdropped
        ) THEN
            RAISE EXCEPTION 'column % does not exist in table %', quote_ident(col), qualified
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;

    others := ARRAY[p_id_column, p_url_column, p_owner_column];
    FOREACH role IN ARRAY ARRAY['status', 'result', 'error', 'analyzed-at'] LOOP
        col := CASE role WHEN 'status' THEN p_status_column
                         WHEN 'result' THEN p_result_column
                         WHEN 'error' THEN p_error_column
                         ELSE p_analyzed_at_column END;
        IF col IS NULL THEN
            others := others || NULL::text;
            CONTINUE;
        END IF;
        other := CASE col WHEN p_id_column THEN 'id' WHEN p_url_column THEN 'url'
                          WHEN p_owner_column THEN 'owner' WHEN others[4] THEN 'status'
                          WHEN others[5] THEN 'result' WHEN others[6] THEN 'error' END;
        IF other IS NOT NULL THEN
            IF role = 'status' THEN
                RAISE EXCEPTION 'status column % of % is also its % column', quote_ident(col),
                    qualified, other
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Give a column of its own, e.g. ALTER TABLE ... ADD COLUMN '
                                 'analysis_status text.';
            END IF;
            RAISE EXCEPTION '% column % of % is also its % column', role, quote_ident(col),
                qualified, other
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Give each write-back column a column of its own.';
        END IF;
        others := others || col;
        SELECT t.typname, x.atttypid, x.atttypmod, x.attgenerated,
               format_type(x.atttypid, x.atttypmod) AS shown
        INTO st
        FROM pg_attribute AS x JOIN pg_type AS t ON t.oid = x.atttypid
        WHERE x.attrelid = rel AND x.attname = col AND x.attnum > 0 AND NOT x.attisdropped;
        IF st.attgenerated <> '' THEN
            RAISE EXCEPTION '% column % of % is a generated column: listener cannot write it',
                role, quote_ident(col), qualified
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF role = 'status' THEN
            -- 10 characters: 'processing' and 'cancelled' are the longest statuses.
            IF st.atttypid = 'varchar'::regtype AND st.atttypmod <> -1
               AND st.atttypmod - 4 < 10 THEN
                RAISE EXCEPTION 'status column % of % holds at most % characters; listener '
                                'writes statuses of up to 10 (processing)',
                    quote_ident(col), qualified, st.atttypmod - 4
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Use text, or varchar(10) or longer.';
            ELSIF st.atttypid = 'bpchar'::regtype THEN
                RAISE EXCEPTION 'status column % of % is %, which pads statuses with spaces',
                    quote_ident(col), qualified, st.shown
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Use text, or varchar(10) or longer.';
            ELSIF st.atttypid NOT IN ('text'::regtype, 'varchar'::regtype)
                  AND st.typname <> 'citext' THEN
                RAISE EXCEPTION 'status column % of % is %; listener writes text (pending, '
                                'processing, complete, failed, cancelled, batched)',
                    quote_ident(col), qualified, st.shown
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Use text, varchar(10) or longer, or citext.';
            END IF;
        ELSIF role = 'result' AND st.atttypid <> 'jsonb'::regtype THEN
            RAISE EXCEPTION 'result column % of % is %; listener writes jsonb (step outputs '
                            'keyed by step)', quote_ident(col), qualified, st.shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = format('Use jsonb: ALTER TABLE %s ALTER COLUMN %I TYPE jsonb '
                                    'USING %I::jsonb', qualified, col, col);
        ELSIF role = 'error' THEN
            IF st.atttypid = 'varchar'::regtype AND st.atttypmod <> -1
               AND st.atttypmod - 4 < 200 THEN
                RAISE EXCEPTION 'error column % of % holds at most % characters; listener '
                                'needs 200 or more (longer errors are cut to fit)',
                    quote_ident(col), qualified, st.atttypmod - 4
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Use text, or varchar(200) or longer.';
            ELSIF st.atttypid NOT IN ('text'::regtype, 'varchar'::regtype)
                  AND st.typname <> 'citext' THEN
                RAISE EXCEPTION 'error column % of % is %; listener writes text (the last '
                                'error message)', quote_ident(col), qualified, st.shown
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Use text, varchar(200) or longer, or citext.';
            END IF;
        ELSIF role = 'analyzed-at'
              AND st.atttypid NOT IN ('timestamptz'::regtype, 'timestamp'::regtype) THEN
            RAISE EXCEPTION 'analyzed-at column % of % is %; listener writes a timestamp (when '
                            'the analysis completed)', quote_ident(col), qualified, st.shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use timestamptz (or timestamp).';
        END IF;
    END LOOP;

    -- Under this function's search_path, format_type qualifies every type outside
    -- pg_catalog (public.my_id), so the casts generated below cannot meet a caller's
    -- pg_temp type of the same name.
    SELECT format_type(x.atttypid, x.atttypmod) INTO id_type
    FROM pg_attribute AS x WHERE x.attrelid = rel AND x.attname = p_id_column;

    -- Re-attaching replaces the previous triggers, functions, grants and settings; the
    -- attachment keeps when it was first made.
    SELECT x.created_at INTO created FROM listener.attachments AS x WHERE x.table_oid = rel;
    PERFORM listener.detach_table(rel);

    EXECUTE format($f$
        CREATE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L
    $f$, 'enqueue_insert_' || rel, format($body$
        BEGIN
            -- Nested: the outer test stays a simple expression (no executor) on every call.
            IF TG_RELID <> %3$s::pg_catalog.oid THEN
                IF NOT EXISTS (
                    SELECT FROM pg_catalog.pg_partition_ancestors(TG_RELID) AS a
                    WHERE a.relid OPERATOR(pg_catalog.=) %3$s::pg_catalog.oid
                ) THEN
                    RAISE EXCEPTION USING MESSAGE = %4$L, ERRCODE = 'wrong_object_type';
                END IF;
            END IF;
            INSERT INTO listener.inserted_rows (source_table, source_id)
            SELECT %1$L, n.%2$I::pg_catalog.text FROM new_rows AS n;
            IF FOUND THEN
                PERFORM pg_catalog.pg_notify('listener_jobs', 'inserted');
            END IF;
            RETURN NULL;
        END;
    $body$, qualified, p_id_column, rel,
        format('listener.enqueue_insert_%s() fires on %s only', rel, qualified)));

    -- A changed URL means a new image: the row's job starts over. Row-level with a WHEN
    -- clause (transition tables cannot be combined with UPDATE OF), so updates that leave the
    -- URL alone, such as the status write-back, never even call the function; pg_notify
    -- folds identical notifications of one transaction into one.
    EXECUTE format($f$
        CREATE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L
    $f$, 'enqueue_update_' || rel, format($body$
        BEGIN
            -- Nested: the outer test stays a simple expression (no executor) on every call.
            IF TG_RELID <> %5$s::pg_catalog.oid THEN
                IF NOT EXISTS (
                    SELECT FROM pg_catalog.pg_partition_ancestors(TG_RELID) AS a
                    WHERE a.relid OPERATOR(pg_catalog.=) %5$s::pg_catalog.oid
                ) THEN
                    RAISE EXCEPTION USING MESSAGE = %6$L, ERRCODE = 'wrong_object_type';
                END IF;
            END IF;
            INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id)
            VALUES (%1$L, NEW.%2$I::pg_catalog.text, NEW.%3$I::pg_catalog.text, %4$s)
            ON CONFLICT (source_table, source_id) DO UPDATE
            SET image_url = EXCLUDED.image_url, owner_id = EXCLUDED.owner_id,
                status = 'pending', attempts = 0, run_after = pg_catalog.now(),
                last_error = NULL, lease_expires_at = NULL, lease_token = NULL,
                worker_id = NULL, started_at = NULL, finished_at = NULL,
                updated_at = pg_catalog.now();
            PERFORM pg_catalog.pg_notify('listener_jobs', '');
            RETURN NULL;
        END;
    $body$, qualified, p_id_column, p_url_column,
        CASE WHEN p_owner_column IS NULL THEN 'NULL::pg_catalog.text'
             ELSE format('NEW.%I::pg_catalog.text', p_owner_column) END,
        rel, format('listener.enqueue_update_%s() fires on %s only', rel, qualified)));

    -- Only an append: no job row is read for update or locked, so the app's DELETE never
    -- waits for a daemon working on the row's job.
    EXECUTE format($f$
        CREATE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L
    $f$, 'forget_delete_' || rel, format($body$
        BEGIN
            -- Nested: the outer test stays a simple expression (no executor) on every call.
            IF TG_RELID <> %3$s::pg_catalog.oid THEN
                IF NOT EXISTS (
                    SELECT FROM pg_catalog.pg_partition_ancestors(TG_RELID) AS a
                    WHERE a.relid OPERATOR(pg_catalog.=) %3$s::pg_catalog.oid
                ) THEN
                    RAISE EXCEPTION USING MESSAGE = %4$L, ERRCODE = 'wrong_object_type';
                END IF;
            END IF;
            INSERT INTO listener.deleted_rows (source_table, source_id, job_id)
            SELECT %1$L, o.%2$I::pg_catalog.text, j.id
            FROM old_rows AS o
            LEFT JOIN listener.jobs AS j
              ON j.source_table = %1$L
             AND j.source_id = o.%2$I::pg_catalog.text COLLATE "C";
            IF FOUND THEN
                PERFORM pg_catalog.pg_notify('listener_jobs', '');
            END IF;
            RETURN NULL;
        END;
    $body$, qualified, p_id_column, rel,
        format('listener.forget_delete_%s() fires on %s only', rel, qualified)));

    -- The table's admission (0019, see admit_entries there): one statement with a cached
    -- generic plan, from entries p_ids and their rows' keys p_keys, each key once. Every part
    -- reads one snapshot, taken before its insert: a job holding a key existed before it;
    -- older than the entry, it is the job of a row deleted since (queued as reinserted),
    -- newer (a URL change, a backfill, a re-analysis), it already reflects the row. A row gone
    -- from the table gets no job. The first p_room jobs are made claimed (processing, leased
    -- to p_worker for p_lease_s seconds under p_token, first attempt). Rows and jobs are
    -- looked up per entry through their keys (OFFSET 0 keeps each lookup a parameterized
    -- index scan).
    EXECUTE format($f$
        CREATE FUNCTION listener.%I(
            p_ids bigint[], p_keys text[], p_room integer, p_worker text,
            p_lease_s double precision, p_token uuid, p_max_attempts integer,
            OUT made bigint, OUT claimed bigint[]
        )
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
            SET plan_cache_mode = force_generic_plan AS %L
    $f$, 'admit_' || rel, format($body$
        BEGIN
            WITH present AS (
                SELECT e.id, e.source_id, s.image_url, s.owner_id,
                       row_number() OVER (ORDER BY e.id) <= p_room AS claim
                FROM unnest(p_ids, p_keys) AS e(id, source_id)
                CROSS JOIN LATERAL (
                    SELECT r.%3$I::text AS image_url, %4$s AS owner_id
                    FROM %1$s AS r WHERE r.%2$I = e.source_id::%5$s
                    OFFSET 0
                ) AS s
            ), enqueued AS (
                INSERT INTO listener.jobs (
                    id, source_table, source_id, image_url, owner_id, status, attempts, claims,
                    max_attempts, worker_id, lease_token, lease_expires_at, started_at)
                OVERRIDING SYSTEM VALUE
                SELECT p.id, %1$L, p.source_id, p.image_url, p.owner_id,
                       CASE WHEN p.claim THEN 'processing' ELSE 'pending' END,
                       CASE WHEN p.claim THEN 1 ELSE 0 END,
                       CASE WHEN p.claim THEN 1 ELSE 0 END,
                       CASE WHEN p.claim THEN p_max_attempts END,
                       CASE WHEN p.claim THEN p_worker END,
                       CASE WHEN p.claim THEN p_token END,
                       CASE WHEN p.claim THEN now() + make_interval(secs => p_lease_s) END,
                       CASE WHEN p.claim THEN now() END
                FROM present AS p
                ON CONFLICT (source_table, source_id) DO NOTHING
                RETURNING id, status
            ), reinserted AS (
                INSERT INTO listener.deleted_rows (source_table, source_id, job_id, reinserted)
                SELECT %1$L, p.source_id, j.id, true
                FROM present AS p
                CROSS JOIN LATERAL (
                    SELECT x.id FROM listener.jobs AS x
                    WHERE x.source_table = %1$L AND x.source_id = p.source_id
                    OFFSET 0
                ) AS j
                WHERE j.id < p.id
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM enqueued) + (SELECT count(*) FROM reinserted),
                   (SELECT coalesce(array_agg(e.id ORDER BY e.id), '{}')
                    FROM enqueued AS e WHERE e.status = 'processing')
            INTO made, claimed;
        END;
    $body$, qualified, p_id_column, p_url_column,
        CASE WHEN p_owner_column IS NULL THEN 'NULL::text'
             ELSE format('r.%I::text', p_owner_column) END,
        id_type));

    EXECUTE format(
        'CREATE TRIGGER listener_enqueue_insert AFTER INSERT ON %s '
        'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION listener.%I()',
        qualified, 'enqueue_insert_' || rel);
    EXECUTE format(
        'CREATE TRIGGER listener_enqueue_update AFTER UPDATE OF %I ON %s FOR EACH ROW '
        'WHEN (OLD.%I IS DISTINCT FROM NEW.%I) EXECUTE FUNCTION listener.%I()',
        p_url_column, qualified, p_url_column, p_url_column, 'enqueue_update_' || rel);
    EXECUTE format(
        'CREATE TRIGGER listener_forget_delete AFTER DELETE ON %s '
        'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION listener.%I()',
        qualified, 'forget_delete_' || rel);

    SELECT string_agg(DISTINCT quote_ident(c), ', ') INTO read_cols
    FROM unnest(ARRAY[p_id_column, p_url_column, p_owner_column]) AS c WHERE c IS NOT NULL;
    SELECT string_agg(DISTINCT quote_ident(c), ', ') INTO write_cols
    FROM unnest(ARRAY[p_status_column, p_result_column, p_error_column,
                      p_analyzed_at_column]) AS c WHERE c IS NOT NULL;
    -- The table's schema, when PUBLIC may not use it already (a schema of the app's own).
    IF NOT has_schema_privilege('listener_owner', schema_name, 'USAGE')
       OR NOT has_schema_privilege('listener_worker', schema_name, 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO listener_owner, listener_worker',
                       schema_name);
    END IF;
    EXECUTE format('GRANT SELECT (%s) ON TABLE %s TO listener_owner', read_cols, qualified);
    EXECUTE format('GRANT SELECT (%s) ON TABLE %s TO listener_worker',
                   concat_ws(', ', read_cols, write_cols), qualified);
    IF write_cols IS NOT NULL THEN
        EXECUTE format('GRANT UPDATE (%s) ON TABLE %s TO listener_worker', write_cols, qualified);
    END IF;
    EXECUTE format('CREATE POLICY listener_access ON %s AS PERMISSIVE FOR ALL '
                   'TO listener_owner, listener_worker USING (true) WITH CHECK (true)',
                   qualified);

    INSERT INTO listener.attachments
        (source_table, table_oid, id_column, id_type, url_column, owner_column, status_column,
         result_column, error_column, analyzed_at_column, created_at)
    VALUES (qualified, rel, p_id_column, id_type, p_url_column, p_owner_column,
            p_status_column, p_result_column, p_error_column, p_analyzed_at_column,
            coalesce(created, now()));
    PERFORM listener.sync_write_back_triggers();
    PERFORM listener.apply_privileges();
    RETURN qualified;
END;
$$;

-- attach(table, id, url, owner, status, result, error, analyzed_at): attach_table() for a
-- table named as the caller would name it (resolved in the caller's search_path: quote
-- mixed-case names). No SET clause, for that reason; it runs with the caller's rights.
DROP FUNCTION listener.attach(text, text, text, text, text, text, text, text);
CREATE FUNCTION listener.attach(
    p_table text, p_id_column text, p_url_column text, p_owner_column text,
    p_status_column text, p_result_column text, p_error_column text,
    p_analyzed_at_column text
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    rel regclass := pg_catalog.to_regclass(p_table);
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', p_table
            USING ERRCODE = 'undefined_table',
                  HINT = 'Give the table as schema.table; quote mixed-case names: ''"MyTable"''.';
    END IF;
    RETURN listener.attach_table(rel, p_id_column, p_url_column, p_owner_column,
                                 p_status_column, p_result_column, p_error_column,
                                 p_analyzed_at_column);
END;
$$;

-- detach(table): detach_table() for a table named as the caller would name it, or as
-- attach recorded it (a table dropped since can still be detached by that name).
DROP FUNCTION listener.detach(text);
CREATE FUNCTION listener.detach(p_table text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    rel regclass := pg_catalog.to_regclass(p_table);
    found_oid oid;
BEGIN
    SELECT x.table_oid INTO found_oid FROM listener.attachments AS x
    WHERE x.source_table = p_table OR (rel IS NOT NULL AND x.table_oid = rel::oid);
    IF found_oid IS NULL THEN
        RETURN false;
    END IF;
    RETURN listener.detach_table(found_oid);
END;
$$;

DROP FUNCTION listener.attach_triggers(text, text, text, text, text);
DROP FUNCTION listener.attach_deletes(text);
DROP FUNCTION listener.attach_deletes_0017(text);
DROP FUNCTION listener.detach_0014(text);

-- reattach_all(): as in 0011, through attach_table (a renamed table is found by its oid).
-- The attachments are read first: no cursor on listener.attachments stays open while
-- attach_table (and apply_privileges) change the schema's objects.
CREATE OR REPLACE FUNCTION listener.reattach_all()
RETURNS TABLE (source_table text, error text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a listener.attachments;
    every listener.attachments[];
BEGIN
    SELECT coalesce(array_agg(x ORDER BY x.source_table), '{}') INTO every
    FROM listener.attachments AS x;
    FOREACH a IN ARRAY every LOOP
        source_table := a.source_table;
        error := NULL;
        IF NOT EXISTS (SELECT FROM pg_class AS c WHERE c.oid = a.table_oid) THEN
            error := 'the table no longer exists';
            RETURN NEXT;
            CONTINUE;
        END IF;
        BEGIN
            source_table := listener.attach_table(
                a.table_oid::regclass, a.id_column, a.url_column, a.owner_column,
                a.status_column, a.result_column, a.error_column, a.analyzed_at_column);
        EXCEPTION WHEN OTHERS THEN
            error := SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- ---------------------------------------------------------------------------------------
-- Ownership and grants
-- ---------------------------------------------------------------------------------------

-- apply_privileges(): every object of the schema belongs to listener_owner; PUBLIC may
-- execute none of its functions; listener_worker may use the schema, read and write its
-- tables and sequences (schema_migrations: read only) and execute every function but the
-- trigger functions (their owner only, so no one else can bind them to a table) and those
-- that change what is attached (attach, detach and their helpers: the migrating role's). Idempotent; run by `listener migrate` after every run that applied a migration and
-- by attach_table. Invoker rights: the caller must be a member of listener_owner.
CREATE FUNCTION listener.apply_privileges() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    owner_oid oid := (SELECT r.oid FROM pg_roles AS r WHERE r.rolname = 'listener_owner');
    r record;
BEGIN
    IF (SELECT n.nspowner FROM pg_namespace AS n WHERE n.nspname = 'listener') <> owner_oid
    THEN
        ALTER SCHEMA listener OWNER TO listener_owner;
    END IF;
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relkind
        FROM pg_class AS c
        WHERE c.relnamespace = 'listener'::regnamespace AND c.relowner <> owner_oid
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          -- Identity and serial sequences follow their table.
          AND NOT EXISTS (SELECT FROM pg_depend AS d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                            AND d.deptype IN ('a', 'i'))
        ORDER BY c.oid
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO listener_owner',
                       CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                      WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
                       r.rel);
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS fn FROM pg_proc AS p
        WHERE p.pronamespace = 'listener'::regnamespace AND p.proowner <> owner_oid
        ORDER BY p.oid
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO listener_owner', r.fn);
    END LOOP;

    REVOKE ALL ON SCHEMA listener FROM PUBLIC;
    GRANT USAGE ON SCHEMA listener TO listener_worker;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA listener FROM PUBLIC;
    FOR r IN
        SELECT p.oid::regprocedure AS fn,
               p.prorettype = 'trigger'::regtype
               OR p.proname IN ('attach', 'attach_table', 'detach', 'detach_table',
                                'reattach_all', 'apply_privileges',
                                'sync_write_back_triggers') AS owner_only
        FROM pg_proc AS p
        WHERE p.pronamespace = 'listener'::regnamespace
        ORDER BY p.oid
    LOOP
        IF r.owner_only THEN
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM listener_worker', r.fn);
        ELSE
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO listener_worker', r.fn);
        END IF;
    END LOOP;
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA listener TO listener_worker;
    REVOKE INSERT, UPDATE, DELETE ON listener.schema_migrations FROM listener_worker;
    GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA listener TO listener_worker;
END;
$$;

-- Every function that has no search_path of its own gets pg_catalog, pg_temp, but those that
-- resolve a table name the caller typed in the caller's search_path (invoker rights, so a
-- caller's path can only redirect the caller's own rights).
DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc AS p
        WHERE p.pronamespace = 'listener'::pg_catalog.regnamespace
          AND NOT p.prosecdef
          AND p.proname NOT IN ('attach', 'detach', 'attachment', 'backfill_chunk',
                                'backfill_ids', 'count_unqueued', 'sample_unqueued')
          AND NOT EXISTS (SELECT FROM pg_catalog.unnest(p.proconfig) AS c
                          WHERE c LIKE 'search\_path=%')
    LOOP
        EXECUTE pg_catalog.format(
            'ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', fn);
    END LOOP;
END;
$$;
