-- 0021_plans: the plans listener caches per connection do not depend on how big its tables
-- were when they were made.
--
-- A generic plan is made once per connection (PL/pgSQL functions with plan_cache_mode =
-- force_generic_plan, and asyncpg's prepared statements after five executions) and kept while
-- the tables it reads grow. A fresh install starts with an empty listener.jobs: a connection
-- whose first claim or admission ran then planned its look-ups of jobs by id or by
-- (source_table, source_id) as sequential scans, or as a bitmap AND with the index of every
-- processing job, and kept those plans at 100,000 jobs and more (a claim of 20 jobs read every
-- job). Every statement of these functions finds its rows by key, so the index is the right
-- plan at any size: the functions turn sequential and bitmap scans off for their own
-- statements (the planner then picks them only where no index applies, as for the few rows of
-- listener.attachments), and JIT, whose threshold the cost of a disabled path would cross. The
-- daemon's own statements are planned for each execution (listener/db/connect.py), so they
-- see the sizes of the moment. tests/integration/test_query_plans.py plans each on empty
-- tables, grows them past 100,000 jobs and checks, on the same connection, for index scans.

-- The leases' index holds the jobs that have a lease, not the processing jobs: a statement
-- that names its jobs by id and requires them processing (a completion, a renewal) can then
-- only read them through the primary key. With the old predicate (status = 'processing') a
-- plan made when few jobs were processing read the ids and this whole index and intersected
-- them (a bitmap AND), which at thousands of processing jobs cost more than the write. Leases
-- are set only on processing jobs and cleared on every way out of that state; the reaper's
-- condition (lease_expires_at < now()) implies the predicate.
DROP INDEX listener.jobs_lease_idx;
CREATE INDEX jobs_lease_idx ON listener.jobs (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;

ALTER FUNCTION listener.admit_entries(integer, integer, text, double precision, uuid, integer)
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off;

-- attach_table: as in 0020, with the admission's settings above; `listener migrate`
-- regenerates the functions of every attached table with it (reattach_all).
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
CREATE OR REPLACE FUNCTION listener.attach_table(
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
    -- generic plan that reads every table through an index whatever their sizes when it was
    -- made (0021), from entries p_ids and their rows' keys p_keys, each key once. Every part
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
            SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
            SET enable_bitmapscan = off SET jit = off AS %L
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

-- claim_jobs(limit, worker, lease_s, token, default_max_attempts, admit): as in 0019, with
-- the admission just in time. A claim takes, in this order and up to p_limit in all:
--   1. pending jobs of priority 0 or less (fresh rows' jobs, retries, re-analyses), in
--      priority then age order;
--   2. when p_admit > 0 (after a wake-up), rows the app inserted, admitted as jobs claimed at
--      once, as many as the claim has room for (up to p_admit): they are priority 0 and
--      newer than every pending job of step 1;
--   3. pending jobs of higher priority numbers (a backfill's 100), in the same order.
-- That is the order in which 0019 ran them, where the admission made up to p_admit pending
-- jobs that the next claim took; in a backlog of inserted rows each job is now written twice
-- (made claimed, finished) instead of three times (made pending, claimed, finished). Rows
-- beyond the room wait in listener.inserted_rows (counted as pending by the status counts)
-- for the next claim, or for admit_inserted_rows() when the daemon is not claiming. One
-- NOTIFY wakes the other daemons when the admission filled the room (more may wait) or made
-- jobs it did not claim (a row re-inserted under a key its old job holds). The claim is the
-- statement between the two "claim" markers, run once per pass
-- (tests/integration/test_query_plans.py EXPLAINs it from this function's source).
CREATE OR REPLACE FUNCTION listener.claim_jobs(
    p_limit integer, p_worker text, p_lease_s double precision, p_token uuid,
    p_default_max_attempts integer, p_admit integer
) RETURNS TABLE (
    id bigint, source_table text, source_id text, image_url text, owner_id text,
    priority integer, attempts integer, max_attempts integer, batch_mode boolean,
    claims integer, done_steps text[]
)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
    admission record;
    got bigint := 0;
    n bigint;
    room integer;
    pending boolean;
    first_priority integer;
    last_priority integer;
BEGIN
    -- After a wake-up (p_admit > 0) the usual case is nothing pending and one new row: a
    -- read of the claim index spares the claim's UPDATE then.
    pending := p_admit <= 0 OR EXISTS (
        SELECT FROM listener.jobs AS x WHERE x.status = 'pending' AND x.run_after <= now());
    FOR pass IN 1..2 LOOP
        IF pass = 1 THEN
            first_priority := -2147483648;
            last_priority := 0;
        ELSE
            room := p_limit - got::integer;
            IF p_admit > 0 AND room > 0 THEN
                SELECT * INTO admission FROM listener.admit_entries(
                    least(p_admit, room), room, p_worker, p_lease_s, p_token,
                    p_default_max_attempts);
                IF cardinality(admission.claimed) > 0 THEN
                    RETURN QUERY
                    SELECT j.id, j.source_table::text, j.source_id::text, j.image_url,
                           j.owner_id, j.priority, j.attempts, j.max_attempts, j.batch_mode,
                           j.claims, '{}'::text[]
                    FROM listener.jobs AS j
                    WHERE j.id = ANY(admission.claimed)
                    ORDER BY j.id;
                    got := got + cardinality(admission.claimed);
                END IF;
                IF admission.admitted > cardinality(admission.claimed)
                   OR admission.taken >= least(p_admit, room) THEN
                    PERFORM pg_notify('listener_jobs', '');
                END IF;
            END IF;
            first_priority := 1;
            last_priority := 2147483647;
        END IF;
        CONTINUE WHEN NOT pending OR got >= p_limit;
        -- claim: begin
        RETURN QUERY
        WITH next AS (
            SELECT x.id
            FROM listener.jobs AS x
            WHERE x.status = 'pending' AND x.run_after <= now()
              AND x.priority >= first_priority AND x.priority <= last_priority
            ORDER BY x.priority, x.run_after, x.id
            LIMIT p_limit - got
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
        GET DIAGNOSTICS n = ROW_COUNT;
        got := got + n;
    END LOOP;
END;
$$;
