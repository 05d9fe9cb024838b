-- 0019_inserted_rows: the app's INSERT only appends to an outbox; the daemon admits the jobs.
--
-- Until now the insert trigger of an attached table wrote the job in the app's transaction:
-- a row of listener.jobs (nine indexes, two CHECK constraints, a speculative insertion for
-- ON CONFLICT), a count delta, and the function's SET clauses. Measured with pgbench on one
-- core (synchronous_commit off, so CPU only): a plain single-row INSERT 116-124 us, the same
-- INSERT into an attached table 258-274 us. The per-statement set-up of the job row (its
-- executor, the indexes opened and their predicates prepared, the constraints compiled)
-- dominates, not the row itself. Now, as 0014 did for deletes:
--   * the trigger appends (source_table, source_id) to listener.inserted_rows, a narrow heap
--     with one index, and sends one NOTIFY per statement: 8-25 us over the plain INSERT. Its
--     payload is 'inserted': a daemon wakes its claim only (admission), not the loops for
--     deleted rows and status write-back, which other NOTIFYs (payload '') still wake;
--   * the function has no SET clause: every name in its body is schema-qualified (the
--     practice PostgreSQL's documentation gives for SECURITY DEFINER functions and extension
--     scripts), so a caller's search_path cannot redirect it;
--   * a daemon admits the outbox after each wake-up (a NOTIFY, a poll, a reconnect) in the
--     transaction of its next claim (listener.claim_jobs(), the claim of queries.sql now a
--     function): admit_entries() takes entries (FOR UPDATE SKIP LOCKED), reads each row's
--     current values from its table and inserts its job, already claimed when the claim
--     left room (no second write). One round trip, one commit, as before. A daemon that is
--     not claiming (paused, buffer full) admits on its own (admit_inserted_rows()), so rows
--     still get their job and the app its status.
-- Nothing is lost: the entry commits with the app's row and is deleted in the transaction
-- that inserts its job. A job is created from the row as it is at admission:
--   * the row is gone (deleted before admission): no job;
--   * a job created after the insert (a URL change, a backfill, a re-analysis) holds the key:
--     nothing to do; one created before it (the row was deleted and inserted again, its old
--     job not yet cleaned up): the row is queued as reinserted, as 0014's trigger did;
--   * the job's id is the entry's id (both come from the jobs' identity sequence), so that
--     order is known.
-- A delete racing an admission: the delete trigger reads the row's job without a lock, so it
-- may not see a job being admitted at that moment and record none. The drain's claim of
-- deleted rows takes an advisory lock that admissions hold (shared) while they read rows and
-- insert jobs, so it sees every admission that read the row; an entry without a job whose row
-- is gone takes the job its key has, which the drain then forgets as any other.

CREATE TABLE listener.inserted_rows (
    id           bigint PRIMARY KEY DEFAULT nextval('listener.jobs_id_seq'::regclass),
    source_table text COLLATE "C" NOT NULL,
    source_id    text COLLATE "C" NOT NULL
);

-- attach_deletes(table): 0017's (now attach_deletes_0017: the delete trigger, and an insert
-- trigger function replaced here), then the insert trigger function above and the table's
-- admission function. It is what attach() (both forms) ends with, so every attach, and
-- migrate's reattach_all(), installs them.
ALTER FUNCTION listener.attach_deletes(text) RENAME TO attach_deletes_0017;
CREATE FUNCTION listener.attach_deletes(p_table text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments := listener.attachment(p_table);
BEGIN
    PERFORM listener.attach_deletes_0017(p_table);
    -- SECURITY DEFINER without SET: its only names are listener.inserted_rows,
    -- pg_catalog.pg_notify and the transition table. A SET clause would cost every insert a
    -- configuration save and restore.
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER AS %L
    $f$, 'enqueue_insert_' || a.table_oid, format($body$
        BEGIN
            INSERT INTO listener.inserted_rows (source_table, source_id)
            SELECT %1$L, n.%2$I::text FROM new_rows AS n;
            IF FOUND THEN
                PERFORM pg_catalog.pg_notify('listener_jobs', 'inserted');
            END IF;
            RETURN NULL;
        END;
    $body$, a.source_table, a.id_column));

    -- The table's admission (see admit_entries): one statement with a cached plan, from
    -- entries p_ids (their ids) and p_keys (their rows' ids), each key once. It runs inside
    -- admit_entries(), as its owner. Every part of the statement reads one snapshot, taken
    -- before its insert: a job the statement finds holding a key existed before it; older
    -- than the entry, it is the job of a row deleted since (queued as reinserted, as 0014's
    -- trigger did), newer (a URL change, a backfill, a re-analysis), it already reflects the
    -- row. A row gone from the table gets no job. The first p_room jobs (in entry order) are
    -- made claimed, as claim_jobs() would claim them: processing, leased to p_worker for
    -- p_lease_s seconds under p_token, first attempt; the others pending. `made` counts the
    -- jobs made plus the rows queued as reinserted, `claimed` lists the jobs made claimed.
    -- Its plan is generic, made once per connection (a custom plan for each call, which the
    -- default plan_cache_mode keeps choosing for a one-element array, cost more than the
    -- statement): rows and jobs are looked up per entry through their keys (OFFSET 0 keeps
    -- each lookup a parameterized index scan; a join would let a generic plan hash whole
    -- tables).
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION listener.%I(
            p_ids bigint[], p_keys text[], p_room integer, p_worker text,
            p_lease_s double precision, p_token uuid, p_max_attempts integer,
            OUT made bigint, OUT claimed bigint[]
        )
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
            SET plan_cache_mode = force_generic_plan AS %L
    $f$, 'admit_' || a.table_oid, format($body$
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
    $body$, a.source_table, a.id_column, a.url_column,
        CASE WHEN a.owner_column IS NULL THEN 'NULL::text'
             ELSE format('r.%I::text', a.owner_column) END,
        a.id_type));
    EXECUTE format('REVOKE EXECUTE ON FUNCTION listener.%I(bigint[], text[], integer, text, '
                   'double precision, uuid, integer) FROM PUBLIC', 'admit_' || a.table_oid);
END;
$$;

-- admit_entries(limit, room, worker, lease_s, token, max_attempts): admits up to p_limit
-- entries of listener.inserted_rows, oldest first, skipping entries another daemon is
-- admitting, and makes up to p_room of their jobs already claimed by p_worker (see the
-- tables' admit_ functions above); `taken` counts the entries (0: nothing was waiting),
-- `admitted` the jobs made plus the rows queued as reinserted, `claimed` lists the jobs made
-- claimed. Entries of tables no longer attached are dropped. Each attached table's entries are
-- admitted by the table's generated function (attach_deletes), one statement; of several
-- entries of one key, the newest.
--
-- SECURITY DEFINER: rows are read as the role that migrated, which owns the triggers that wrote
-- the entries, so row-level security on an app's table (which a daemon's role may be subject
-- to) cannot hide a row and have its entry taken for a deleted row's. Revoked from PUBLIC.
CREATE FUNCTION listener.admit_entries(
    p_limit integer, p_room integer, p_worker text, p_lease_s double precision, p_token uuid,
    p_max_attempts integer, OUT taken bigint, OUT admitted bigint, OUT claimed bigint[]
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    ids bigint[];
    tables text[];
    keys text[];
    locked text;
    a record;
    r record;
BEGIN
    taken := 0;
    admitted := 0;
    claimed := '{}';
    -- The entries, and the advisory lock (held until commit, taken before any row is read:
    -- claim_deleted_rows() waits for it) when there are any.
    WITH taken AS (
        DELETE FROM listener.inserted_rows AS i
        WHERE i.id = ANY(ARRAY(
            SELECT x.id FROM listener.inserted_rows AS x
            ORDER BY x.id LIMIT p_limit
            FOR UPDATE SKIP LOCKED))
        RETURNING i.id, i.source_table, i.source_id
    )
    SELECT array_agg(t.id), array_agg(t.source_table), array_agg(t.source_id),
           CASE WHEN count(*) > 0
                THEN (SELECT pg_advisory_xact_lock_shared(7814717795847138676)) END
    INTO ids, tables, keys, locked
    FROM taken AS t;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    taken := cardinality(ids);
    FOR a IN
        -- Each attached table, with its entries, each key once (the newest entry of a key).
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
            -- One table that cannot be read (a column renamed since attach, say) does not
            -- hold up the others: its entries go back to wait for a fix (or are dropped with
            -- the table itself), and the reason goes to the server's log and the caller.
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
REVOKE EXECUTE ON FUNCTION listener.admit_entries(
    integer, integer, text, double precision, uuid, integer) FROM PUBLIC;

-- admit_inserted_rows(limit, claiming): admit_entries(limit) on its own, for a daemon that is
-- not claiming (paused, or its buffer full) and for `listener cancel`; returns the entries
-- taken. Its commit does not wait for the WAL flush (synchronous_commit off for the caller's
-- transaction; a SET clause of the definer function would restore it on return): a crash
-- that loses it loses the entries' deletion with their jobs, so they are admitted again.
CREATE FUNCTION listener.admit_inserted_rows(p_limit integer, p_claiming integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT * INTO r FROM listener.admit_entries(p_limit, 0, NULL, 0, NULL, NULL);
    IF r.admitted > p_claiming OR (r.taken >= p_limit AND p_limit > 0) THEN
        PERFORM pg_notify('listener_jobs', '');
    END IF;
    RETURN r.taken;
END;
$$;
REVOKE EXECUTE ON FUNCTION listener.admit_inserted_rows(integer, integer) FROM PUBLIC;

-- claim_jobs(limit, worker, lease_s, token, default_max_attempts, admit): claims up to p_limit
-- runnable jobs for worker p_worker, leased for p_lease_s seconds under token p_token (see the
-- claim_jobs query of queries.sql), then admits up to p_admit rows (0: none) in the same
-- transaction, the first of them as jobs claimed at once if the claim left room: one round
-- trip, one commit and one write of the job between a NOTIFY and the provider. The claim is
-- the statement between the two "claim" markers below (tests/integration/test_query_plans.py
-- EXPLAINs it from this function's source), planned once per connection (generic: a custom
-- plan for every claim costs more than the claim). One NOTIFY wakes the other daemons when the
-- admission left jobs pending, or took as many rows as it could (more may wait).
CREATE FUNCTION listener.claim_jobs(
    p_limit integer, p_worker text, p_lease_s double precision, p_token uuid,
    p_default_max_attempts integer, p_admit integer
) RETURNS TABLE (
    id bigint, source_table text, source_id text, image_url text, owner_id text,
    priority integer, attempts integer, max_attempts integer, batch_mode boolean,
    claims integer, done_steps text[]
)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    admission record;
    claimed bigint;
BEGIN
    -- After a wake-up (p_admit > 0) the usual case is nothing pending and one new row: a
    -- read of the claim index spares the claim's UPDATE then.
    IF p_admit > 0 AND NOT EXISTS (
        SELECT FROM listener.jobs AS x WHERE x.status = 'pending' AND x.run_after <= now()
    ) THEN
        claimed := 0;
    ELSE
    -- claim: begin
    RETURN QUERY
    WITH next AS (
        SELECT x.id
        FROM listener.jobs AS x
        WHERE x.status = 'pending' AND x.run_after <= now()
        ORDER BY x.priority, x.run_after, x.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE listener.jobs AS j
        SET status = 'processing',
            attempts = j.attempts + 1,
            claims = j.claims + 1,
            max_attempts = coalesce(j.max_attempts, p_default_max_attempts),
            worker_id = p_worker,
            lease_token = p_token,
            lease_expires_at = now() + make_interval(secs => p_lease_s),
            started_at = now(),
            updated_at = now()
        WHERE j.id = ANY(ARRAY(SELECT next.id FROM next))
        RETURNING j.id, j.source_table, j.source_id, j.image_url, j.owner_id, j.priority,
                  j.attempts, j.max_attempts, j.batch_mode, j.claims, j.run_after,
                  CASE WHEN j.claims > 1
                       THEN ARRAY(SELECT r.step FROM listener.results AS r
                                  WHERE r.job_id = j.id)
                       ELSE '{}'::text[] END AS done_steps
    )
    SELECT c.id, c.source_table::text, c.source_id::text, c.image_url, c.owner_id,
           c.priority, c.attempts, c.max_attempts, c.batch_mode, c.claims, c.done_steps
    FROM claimed AS c
    ORDER BY c.priority, c.run_after, c.id;
    -- claim: end
    GET DIAGNOSTICS claimed = ROW_COUNT;
    END IF;
    IF p_admit > 0 THEN
        -- New rows fill the room the pending jobs left: made claimed, no second write. While
        -- pending jobs fill every claim (a backlog), new rows wait as pending jobs, and the
        -- next claim takes them in priority order.
        SELECT * INTO admission FROM listener.admit_entries(
            p_admit, p_limit - claimed::integer, p_worker, p_lease_s, p_token,
            p_default_max_attempts);
        IF cardinality(admission.claimed) > 0 THEN
            RETURN QUERY
            SELECT j.id, j.source_table::text, j.source_id::text, j.image_url, j.owner_id,
                   j.priority, j.attempts, j.max_attempts, j.batch_mode, j.claims,
                   '{}'::text[]
            FROM listener.jobs AS j
            WHERE j.id = ANY(admission.claimed)
            ORDER BY j.id;
        END IF;
        IF admission.admitted > cardinality(admission.claimed)
           OR admission.taken >= p_admit THEN
            PERFORM pg_notify('listener_jobs', '');
        END IF;
    END IF;
END;
$$;

-- job_of_deleted_row(table, id): the job that holds row (table, id)'s key while the row is gone
-- from its table; NULL when the row exists (again), holds no job, or the table is no longer
-- attached. For a deleted row whose delete trigger saw no job (see below).
CREATE FUNCTION listener.job_of_deleted_row(p_table text, p_id text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments;
    found_job bigint;
BEGIN
    SELECT * INTO a FROM listener.attachments AS x WHERE x.source_table = p_table;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    EXECUTE format($q$
        SELECT j.id FROM listener.jobs AS j
        WHERE j.source_table = %1$L AND j.source_id = $1
          AND NOT EXISTS (SELECT 1 FROM %1$s AS s WHERE s.%2$I = $1::%3$s)
    $q$, a.source_table, a.id_column, a.id_type)
    INTO found_job USING p_id;
    RETURN found_job;
EXCEPTION WHEN OTHERS THEN
    -- A table that cannot be read (dropped, a column renamed) must not stop the drain of
    -- every other deleted row: the entry is cleaned up as one whose delete saw no job.
    RAISE WARNING 'job of deleted row % of % not looked up: %', p_id, p_table, SQLERRM;
    RETURN NULL;
END;
$$;

-- claim_deleted_rows(limit, lease_s): the claim of deleted rows of queries.sql (0014), after
-- the advisory lock of admit_entries(), exclusive: every admission that read one of these rows
-- before its delete committed has committed too, and the claim sees its job. An entry whose
-- delete trigger saw no job (an admission, or a backfill, was making it at that moment) takes
-- the job its key holds while the row is gone, and keeps it for its next attempts. Any later
-- admission reads the row as gone and makes no job.
CREATE FUNCTION listener.claim_deleted_rows(p_limit integer, p_lease_s double precision)
RETURNS TABLE (
    id bigint, source_table text, source_id text, job_id bigint, reinserted boolean,
    attempts integer
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock(7814717795847138676);
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

-- detach(table): as in 0014 (now detach_0014), and the table's admission function goes too.
-- Entries the table still has are dropped by the next admission (the table is no longer
-- attached).
ALTER FUNCTION listener.detach(text) RENAME TO detach_0014;
CREATE FUNCTION listener.detach(p_table text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    rel regclass := to_regclass(p_table);
    oid_of oid;
BEGIN
    SELECT x.table_oid INTO oid_of FROM listener.attachments AS x
    WHERE x.source_table = p_table OR (rel IS NOT NULL AND x.table_oid = rel::oid);
    IF NOT listener.detach_0014(p_table) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I(bigint[], text[], integer, text, '
                   'double precision, uuid, integer)', 'admit_' || oid_of);
    RETURN true;
END;
$$;
