-- 0016_dedup: duplicate images are not paid twice.
--
-- Each result records what its step looked at: the SHA-256 of the image bytes and, when the
-- local analysis had computed it before the step, the image's 64-bit perceptual hash. Before a
-- paid step runs, the dispatcher looks up a stored result of the same step for the same bytes
-- (or, in near-duplicate mode, a perceptual hash within a few bits) and stores a copy at $0
-- instead of calling the provider (see listener/dedup.py and README "Duplicate images").
--
-- The digest lives on the result row, written by the same fenced statement that stores the
-- result: a result and the bytes it describes cannot drift apart (a row whose URL changes
-- loses its results with their digests, 0002's jobs_forget_results).
--
--   image_sha256  the 32-byte SHA-256 of the bytes the step analyzed (NULL: not fetched).
--   image_phash   the 64-bit perceptual hash of the image (ImageHash's phash, as a signed
--                 bigint), when the local analysis ran before the step.
--   reused_from   on a copy: the job whose paid result it copies. Always the original, never
--                 a copy (a copy of a copy records the first one's origin). No foreign key:
--                 the origin may be pruned later, the copy keeps its output.
--   reuse_kind    on a copy: 'sha256' (identical bytes) or 'phash' (near duplicate).
--   saved_usd     on a copy: what the original cost, i.e. what the copy did not pay.
--
-- The constraints are NOT VALID: existing rows (all NULL) are not scanned under the lock.
ALTER TABLE listener.results
    ADD COLUMN image_sha256 bytea,
    ADD COLUMN image_phash  bigint,
    ADD COLUMN reused_from  bigint,
    ADD COLUMN reuse_kind   text,
    ADD COLUMN saved_usd    numeric(16, 9);
ALTER TABLE listener.results
    ADD CONSTRAINT results_sha256_len CHECK (octet_length(image_sha256) = 32) NOT VALID,
    ADD CONSTRAINT results_reuse_kind
        CHECK (reuse_kind IS NULL
               OR (reuse_kind IN ('sha256', 'phash')
                   AND reused_from IS NOT NULL AND saved_usd IS NOT NULL)) NOT VALID;

-- Exact duplicates: results of one step for the same bytes.
CREATE INDEX results_sha256_idx ON listener.results (image_sha256, step)
    WHERE image_sha256 IS NOT NULL;

-- Near duplicates: two 64-bit hashes within 3 bits of each other agree on at least one of their
-- four 16-bit quarters (pigeonhole), so the candidates are found through these four indexes
-- (a BitmapOr), never by scanning every result; the Hamming distance is checked on them.
CREATE INDEX results_phash_q0_idx ON listener.results (step, ((image_phash >> 48) & 65535))
    WHERE image_phash IS NOT NULL;
CREATE INDEX results_phash_q1_idx ON listener.results (step, ((image_phash >> 32) & 65535))
    WHERE image_phash IS NOT NULL;
CREATE INDEX results_phash_q2_idx ON listener.results (step, ((image_phash >> 16) & 65535))
    WHERE image_phash IS NOT NULL;
CREATE INDEX results_phash_q3_idx ON listener.results (step, (image_phash & 65535))
    WHERE image_phash IS NOT NULL;

-- What deduplication saved, kept as the spend is (0008): each stored copy appends a delta
-- (save_step in queries.sql), listener.roll_up_dedup_savings folds them per provider and UTC
-- day, and readers add the deltas not folded yet. Savings are history: deleting a copy later
-- (re-analysis, prune) does not take back what was not paid.
CREATE TABLE listener.dedup_deltas (
    provider text    NOT NULL,
    day      date    NOT NULL,
    steps    bigint  NOT NULL,
    usd      numeric NOT NULL
);
CREATE TABLE listener.dedup_by_day (
    provider text    NOT NULL,
    day      date    NOT NULL,
    steps    bigint  NOT NULL,
    usd      numeric NOT NULL,
    PRIMARY KEY (provider, day)
);

-- roll_up_dedup_savings(): folds the committed savings deltas; 0 without waiting when another
-- rollup holds the lock. Called with roll_up_job_counts (queries.sql), on the same schedule.
CREATE FUNCTION listener.roll_up_dedup_savings() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    folded bigint;
BEGIN
    -- The key: the bytes of "lstndedp".
    IF NOT pg_try_advisory_xact_lock(7814717795897533552) THEN
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
