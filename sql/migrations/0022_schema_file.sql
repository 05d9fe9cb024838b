-- 0022_schema_file: the schema is readable in one file, sql/schema.sql, which new installs
-- apply instead of replaying the migrations (`listener migrate` records every migration as
-- applied then); tests/integration/test_schema_file.py checks that schema.sql and the
-- migrations make the same schema, with or without tables attached before an upgrade.
--
-- The wrappers the attach path once grew (0014's attach_triggers, 0017 and 0019's
-- attach_deletes and attach_deletes_0017, 0019's detach_0014) were restated as single
-- functions and dropped by 0020 (attach_table, detach_table), and the setting
-- listener.enqueue_counts of 0017, which nothing sets since 0019, left jobs_count_insert's
-- WHEN clause there too; attach_table writes each generated function once. What was left
-- for one file to declare:
--
-- * The two checks of listener.results added NOT VALID by 0016 (so that adding them did not
--   scan the table under its lock) are validated, so that schema.sql declares them as plain
--   CHECK constraints. Validation cannot fail: the rows before 0016 had both columns NULL, and
--   every row written since was checked. It reads listener.results once, under a SHARE UPDATE
--   EXCLUSIVE lock, which blocks neither reads nor writes of the table.
ALTER TABLE listener.results VALIDATE CONSTRAINT results_sha256_len;
ALTER TABLE listener.results VALIDATE CONSTRAINT results_reuse_kind;
