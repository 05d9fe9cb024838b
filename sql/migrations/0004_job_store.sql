-- 0004_job_store: what the fenced job store needs.
--
-- * max_attempts NULL means "the daemon's LISTENER_MAX_ATTEMPTS": the attach triggers insert
--   rows without it, and the first claim fills it in, so the setting holds on every path
--   (before, the column default 5 applied to every row a trigger enqueued).
-- * claims counts every claim and is never given back (attempts is, on deferral, release and
--   batching): above 1, an earlier run may have left external side effects to clean up.
ALTER TABLE listener.jobs ALTER COLUMN max_attempts DROP NOT NULL;
ALTER TABLE listener.jobs ALTER COLUMN max_attempts DROP DEFAULT;
ALTER TABLE listener.jobs ADD COLUMN claims integer NOT NULL DEFAULT 0;
-- A first claim (claims becomes 1) skips looking for stored steps: jobs that already have
-- results count as claimed once, so their next run still resumes after them.
UPDATE listener.jobs AS j SET claims = 1
WHERE EXISTS (SELECT 1 FROM listener.results AS r WHERE r.job_id = j.id);
