-- 0010_events: events for live UIs. Every terminal change of a job (its status becomes
-- complete, failed or cancelled) is announced with NOTIFY listener_events, and queued for
-- webhooks in listener.event_outbox when some daemon runs with LISTENER_WEBHOOK_URL.
--
-- Both come from one statement-level AFTER UPDATE trigger with transition tables, so a
-- statement that completes 100 jobs calls it once, inside the fenced write's own transaction:
--   * NOTIFY is transactional: Postgres delivers it when (and only if) the change commits, so
--     a LISTENer hears each committed terminal change once, and never one that rolled back.
--   * The outbox row commits or rolls back with the change, so a crash loses no event; the
--     daemons deliver the outbox at least once (listener/webhooks.py).
--
-- Event: {"table": source table as attached (quoted, schema-qualified), "row_id": the app
-- row's id as text, "status": "complete" | "failed" | "cancelled", "job_id": listener.jobs.id}.

-- Whether terminal events are queued for webhooks. One row; a daemon started with
-- LISTENER_WEBHOOK_URL sets `webhooks` before it claims anything. Why a flag rather than
-- always queueing and pruning: a deployment without webhooks would otherwise pay one outbox
-- insert (a heap and index tuple, WAL) per finished job and a prune later; the flag costs one
-- read of a one-row table per statement that finishes jobs.
CREATE TABLE listener.event_settings (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    webhooks   boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO listener.event_settings DEFAULT VALUES;

-- Events waiting for webhook delivery. A daemon claims due rows (FOR UPDATE SKIP LOCKED, so
-- daemons share the work) by pushing next_attempt_at past the request's timeout (a lease),
-- POSTs them, then deletes the delivered ones and pushes the others back by a full-jitter
-- backoff. A daemon killed mid-delivery leaves its rows to come due again: at least once.
CREATE TABLE listener.event_outbox (
    id              bigserial   PRIMARY KEY,
    event           jsonb       NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_outbox_due_idx ON listener.event_outbox (next_attempt_at, id);

-- Statement-level: one call per UPDATE statement on listener.jobs, whatever its row count.
-- Claims and lease renewals (most statements) change no job to a terminal status: one scan
-- of the statement's new rows finds none and the function returns. Payloads stay under
-- NOTIFY's 8000-byte limit: a row id too long for it is left out ("row_id": null,
-- "row_id_too_long": true; the job id still names the job), since a failing pg_notify would
-- fail the job's own write. SECURITY DEFINER (with a fixed search_path; every name is
-- qualified): whichever role changed the job, an app role's trigger included, may queue the
-- event without rights on listener's tables, so no writer fails for lack of them.
CREATE FUNCTION listener.emit_terminal_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sent integer;
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM new_jobs WHERE status IN ('complete', 'failed', 'cancelled')
    ) THEN
        RETURN NULL;
    END IF;

    WITH events AS MATERIALIZED (
        SELECT n.id, jsonb_build_object(
                   'table', n.source_table, 'row_id', n.source_id,
                   'status', n.status, 'job_id', n.id) AS event
        FROM new_jobs AS n JOIN old_jobs AS o ON o.id = n.id
        WHERE n.status IN ('complete', 'failed', 'cancelled')
          AND o.status IS DISTINCT FROM n.status
    ), queued AS (
        INSERT INTO listener.event_outbox (event)
        SELECT e.event FROM events AS e
        WHERE (SELECT s.webhooks FROM listener.event_settings AS s)
        ORDER BY e.id
    )
    SELECT count(pg_notify('listener_events',
               CASE WHEN octet_length(e.event::text) < 7900 THEN e.event::text
                    ELSE (e.event || '{"row_id": null, "row_id_too_long": true}')::text END))
    INTO sent
    FROM (SELECT * FROM events ORDER BY id) AS e;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_terminal_events
    AFTER UPDATE ON listener.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION listener.emit_terminal_events();
