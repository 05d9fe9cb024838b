-- 0015_face_review: faces that users manage. Suggestions (similarity between the suggest and the
-- auto-assign thresholds, 80-95 by default) are accepted or rejected, people are merged and
-- named, from the app (the functions below) and from `listener faces ...`.
--
-- Owner scoping: every function takes the owner first and acts only on that owner's faces,
-- people and suggestions; an id of another owner gets the same error as an id that does not
-- exist (no_data_found), so a caller cannot probe other owners' ids. NULL is the owner of rows
-- without one (tables attached without --owner-column). The functions trust the owner they are
-- given: the app passes the signed-in user's owner id (see README, "Faces").
--
-- SECURITY DEFINER: an app role needs no rights on listener's tables, only
--   GRANT USAGE ON SCHEMA listener TO app_role;
--   GRANT EXECUTE ON FUNCTION
--       listener.face_counts(text), listener.face_people(text, integer, integer),
--       listener.open_face_suggestions(text, integer, integer),
--       listener.accept_suggestion(text, text, text), listener.reject_suggestion(text, text, text),
--       listener.merge_people(text, bigint, bigint[]), listener.rename_person(text, bigint, text)
--   TO app_role;
--
-- Errors (SQLSTATE): no_data_found (P0002) for a face, suggestion or person that is not the
-- owner's; object_not_in_prerequisite_state (55000) for rejecting an accepted suggestion;
-- invalid_parameter_value (22023) for a limit out of range, a person merged into itself or a
-- name with control characters; string_data_right_truncation (22001) for a name over 200
-- characters; program_limit_exceeded (54000) for more than 1,000 people merged at once.

-- Suggestions carry their face's owner, so an owner's open suggestions, and the review work
-- waiting per owner on the status page, are read from one small partial index, however many
-- suggestions were decided before. decided_at: when accepted, rejected or superseded.
ALTER TABLE listener.face_suggestions
    ADD COLUMN owner_id   text,
    ADD COLUMN decided_at timestamptz;
UPDATE listener.face_suggestions AS s SET owner_id = f.owner_id
FROM listener.faces AS f
WHERE f.face_id = s.face_id;

-- 'superseded': closed without a decision of its own: another suggestion of the same face was
-- accepted, or the face and its candidate came to be one person (an accept or a merge).
ALTER TABLE listener.face_suggestions DROP CONSTRAINT face_suggestions_status_check;
ALTER TABLE listener.face_suggestions ADD CONSTRAINT face_suggestions_status_check
    CHECK (status IN ('open', 'accepted', 'rejected', 'superseded'));

CREATE INDEX face_suggestions_open_idx ON listener.face_suggestions (owner_id, similarity DESC)
    WHERE status = 'open';
-- Deleting a person (merge) cascades to suggestions by person_id: without an index each delete
-- would scan every suggestion.
CREATE INDEX face_suggestions_person_idx ON listener.face_suggestions (person_id);
CREATE INDEX faces_owner_idx ON listener.faces (owner_id, person_id);
CREATE INDEX people_owner_idx ON listener.people (owner_id);

-- Open suggestions per owner for `listener status`, /status and the status page, kept as 0008
-- keeps the job counts: writers of listener.face_suggestions only append their statement's
-- net change to face_review_deltas (statement triggers with transition tables: no shared row
-- is locked, so two jobs of one owner never wait for each other), roll_up_face_review_counts()
-- folds them into face_review_counts, and readers add the deltas not folded yet. A status read
-- costs the owners with open suggestions, not the suggestions.
CREATE TABLE listener.face_review_deltas (
    owner_id text,
    delta    bigint NOT NULL
);
CREATE TABLE listener.face_review_counts (
    owner_id text,
    n        bigint NOT NULL
);
CREATE UNIQUE INDEX face_review_counts_key
    ON listener.face_review_counts ((coalesce(owner_id, '')), (owner_id IS NULL));
INSERT INTO listener.face_review_counts (owner_id, n)
SELECT owner_id, count(*) FROM listener.face_suggestions WHERE status = 'open' GROUP BY 1;

CREATE FUNCTION listener.count_inserted_suggestions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO listener.face_review_deltas (owner_id, delta)
    SELECT n.owner_id, count(*) FROM new_rows AS n WHERE n.status = 'open' GROUP BY 1;
    RETURN NULL;
END;
$$;
CREATE FUNCTION listener.count_updated_suggestions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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
CREATE FUNCTION listener.count_deleted_suggestions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO listener.face_review_deltas (owner_id, delta)
    SELECT o.owner_id, -count(*) FROM old_rows AS o WHERE o.status = 'open' GROUP BY 1;
    RETURN NULL;
END;
$$;
CREATE FUNCTION listener.count_truncated_suggestions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM listener.face_review_deltas;
    DELETE FROM listener.face_review_counts;
    RETURN NULL;
END;
$$;
CREATE TRIGGER face_suggestions_count_insert AFTER INSERT ON listener.face_suggestions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_inserted_suggestions();
CREATE TRIGGER face_suggestions_count_update AFTER UPDATE ON listener.face_suggestions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_updated_suggestions();
CREATE TRIGGER face_suggestions_count_delete AFTER DELETE ON listener.face_suggestions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_deleted_suggestions();
CREATE TRIGGER face_suggestions_count_truncate AFTER TRUNCATE ON listener.face_suggestions
    FOR EACH STATEMENT EXECUTE FUNCTION listener.count_truncated_suggestions();

-- roll_up_face_review_counts(): folds the committed deltas into the counts in one statement;
-- the delta rows folded, 0 without waiting when another rollup is running. Run by the
-- daemon's counters rollup and before each status read.
CREATE FUNCTION listener.roll_up_face_review_counts() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    folded bigint;
BEGIN
    -- The key: the bytes of "lstnface".
    IF NOT pg_try_advisory_xact_lock(7814717795930825573) THEN
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
    -- Owners whose suggestions were all decided: no row to read.
    IF folded > 0 THEN
        DELETE FROM listener.face_review_counts WHERE n = 0;
    END IF;
    RETURN folded;
END;
$$;

-- lock_owner_faces(owner): until the end of the transaction, no one else changes which person
-- any face of `owner` belongs to. Taken first (before any row lock) by apply_face_effects when
-- it assigns a face or records a suggestion (both refer to the matched face's person), and by
-- the functions below that move faces or delete people. Without it a merge could delete a
-- person that a job's face is joining at that moment, and the face would silently lose its
-- person (faces.person_id is ON DELETE SET NULL), or fail the job's step (a suggestion's
-- person_id is a foreign key).
CREATE FUNCTION listener.lock_owner_faces(p_owner text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.pg_advisory_xact_lock(
        pg_catalog.hashtext('listener.faces'), pg_catalog.hashtext(coalesce(p_owner, '')));
$$;
-- Left executable by PUBLIC: apply_face_effects calls it as the daemon's role, and any role
-- may take advisory locks anyway.

-- apply_face_effects, as in 0007, and: the owner's faces lock when a face is assigned or
-- suggested (a step with new faces only takes none); the suggestions' owner.
CREATE OR REPLACE FUNCTION listener.apply_face_effects(
    p_job_id bigint, p_source_table text, p_source_id text, p_owner_id text, p_effect jsonb
) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    face jsonb;
    person bigint;
    people jsonb := '{}'::jsonb;
BEGIN
    IF EXISTS (
        SELECT 1 FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb)) AS f
        WHERE f->>'decision' IN ('assigned', 'suggested')
    ) THEN
        PERFORM listener.lock_owner_faces(p_owner_id);
    END IF;

    INSERT INTO listener.faces
        (face_id, collection_id, owner_id, job_id, source_table, source_id, bounding_box,
         confidence)
    SELECT f->>'face_id', p_effect->>'collection_id', p_owner_id, p_job_id, p_source_table,
           p_source_id, f->'bounding_box', (f->>'confidence')::float8
    FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb)) AS f
    ON CONFLICT (face_id) DO NOTHING;

    PERFORM 1 FROM listener.faces
    WHERE face_id IN (
        SELECT f->>'matched_face_id'
        FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb)) AS f
        WHERE f->>'decision' = 'assigned'
    )
    ORDER BY face_id
    FOR UPDATE;

    FOR face IN SELECT * FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb))
    LOOP
        person := NULL;
        IF face->>'decision' = 'assigned' THEN
            person := listener.assign_face(
                face->>'face_id', face->>'matched_face_id', (face->>'similarity')::float8);
        ELSIF face->>'decision' = 'suggested' THEN
            INSERT INTO listener.face_suggestions
                (face_id, candidate_face_id, person_id, similarity, owner_id)
            SELECT face->>'face_id', m.face_id, m.person_id, (face->>'similarity')::float8,
                   p_owner_id
            FROM listener.faces AS m WHERE m.face_id = face->>'matched_face_id'
            ON CONFLICT (face_id, candidate_face_id) DO NOTHING;
        END IF;
        IF person IS NULL THEN  -- not assigned now: whatever person the face already has
            SELECT f.person_id INTO person FROM listener.faces AS f
            WHERE f.face_id = face->>'face_id';
        END IF;
        people := people || jsonb_build_object(face->>'face_id', person);
    END LOOP;
    RETURN people;
END;
$$;

-- face_counts(owner): one row: the owner's people, faces, faces in no person, open suggestions.
CREATE FUNCTION listener.face_counts(p_owner text)
RETURNS TABLE (people bigint, faces bigint, unassigned bigint, open_suggestions bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT
        (SELECT count(*) FROM listener.people AS p
         WHERE p.owner_id = p_owner OR (p_owner IS NULL AND p.owner_id IS NULL)),
        (SELECT count(*) FROM listener.faces AS f
         WHERE f.owner_id = p_owner OR (p_owner IS NULL AND f.owner_id IS NULL)),
        (SELECT count(*) FROM listener.faces AS f
         WHERE f.person_id IS NULL
           AND (f.owner_id = p_owner OR (p_owner IS NULL AND f.owner_id IS NULL))),
        (SELECT count(*) FROM listener.face_suggestions AS s
         WHERE s.status = 'open'
           AND (s.owner_id = p_owner OR (p_owner IS NULL AND s.owner_id IS NULL)));
$$;
REVOKE ALL ON FUNCTION listener.face_counts(text) FROM PUBLIC;

-- face_people(owner, limit, offset): the owner's people, most faces first, each with a sample
-- face (its most confident one) and the source row it was found in.
CREATE FUNCTION listener.face_people(
    p_owner text, p_limit integer DEFAULT 100, p_offset integer DEFAULT 0
) RETURNS TABLE (
    person_id bigint, name text, faces bigint, sample_face_id text, sample_source_table text,
    sample_source_id text, sample_bounding_box jsonb, created_at timestamptz
)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_offset IS NULL OR p_offset < 0
    THEN
        RAISE EXCEPTION 'limit must be 1 to 1000 and offset 0 or more (got %, %)',
            p_limit, p_offset USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT p.id, p.name, n.faces, s.face_id, s.source_table, s.source_id, s.bounding_box,
           p.created_at
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
    WHERE p.owner_id = p_owner OR (p_owner IS NULL AND p.owner_id IS NULL)
    ORDER BY n.faces DESC, p.id
    LIMIT p_limit OFFSET p_offset;
END;
$$;
REVOKE ALL ON FUNCTION listener.face_people(text, integer, integer) FROM PUBLIC;

-- open_face_suggestions(owner, limit, offset): the owner's open suggestions, most similar
-- first: the face and its source row, the candidate face and its row, the candidate's person
-- now (NULL when it has none yet) and the similarity (percent).
CREATE FUNCTION listener.open_face_suggestions(
    p_owner text, p_limit integer DEFAULT 50, p_offset integer DEFAULT 0
) RETURNS TABLE (
    face_id text, source_table text, source_id text, bounding_box jsonb,
    candidate_face_id text, candidate_source_table text, candidate_source_id text,
    candidate_bounding_box jsonb, person_id bigint, person_name text,
    similarity double precision, created_at timestamptz
)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_offset IS NULL OR p_offset < 0
    THEN
        RAISE EXCEPTION 'limit must be 1 to 1000 and offset 0 or more (got %, %)',
            p_limit, p_offset USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT s.face_id, f.source_table, f.source_id, f.bounding_box,
           s.candidate_face_id, c.source_table, c.source_id, c.bounding_box,
           c.person_id, p.name, s.similarity, s.created_at
    FROM listener.face_suggestions AS s
    JOIN listener.faces AS f ON f.face_id = s.face_id
    LEFT JOIN listener.faces AS c ON c.face_id = s.candidate_face_id
    LEFT JOIN listener.people AS p ON p.id = c.person_id
    WHERE s.status = 'open'
      AND (s.owner_id = p_owner OR (p_owner IS NULL AND s.owner_id IS NULL))
    ORDER BY s.similarity DESC, s.created_at, s.face_id, s.candidate_face_id
    LIMIT p_limit OFFSET p_offset;
END;
$$;
REVOKE ALL ON FUNCTION listener.open_face_suggestions(text, integer, integer) FROM PUBLIC;

-- close_settled_suggestions(person): open suggestions whose face and candidate are both in
-- `person` need no decision any more; they become 'superseded'. Internal.
CREATE FUNCTION listener.close_settled_suggestions(p_person bigint) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE listener.face_suggestions AS s
    SET status = 'superseded', decided_at = now()
    FROM listener.faces AS f, listener.faces AS c
    WHERE f.person_id = p_person AND s.face_id = f.face_id AND s.status = 'open'
      AND c.face_id = s.candidate_face_id AND c.person_id = p_person;
$$;
REVOKE ALL ON FUNCTION listener.close_settled_suggestions(bigint) FROM PUBLIC;

-- accept_suggestion(owner, face, candidate): the face is the candidate's person. Returns that
-- person's id.
--
-- - The face joins the candidate's person, created (with the candidate) when the candidate
--   has none. A face that was in another person leaves it alone: the other faces of that
--   person stay where they are (people are merged only by merge_people).
-- - The suggestion becomes 'accepted'; the face's other open suggestions, and any open
--   suggestion now inside the person, become 'superseded'. A person left with no face is
--   deleted.
-- - Accepting an accepted suggestion again changes nothing and returns the face's person
--   (a retried request is harmless). A rejected or superseded one may still be accepted (the
--   user changed their mind).
CREATE FUNCTION listener.accept_suggestion(
    p_owner text, p_face_id text, p_candidate_face_id text
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s listener.face_suggestions;
    face listener.faces;
    candidate listener.faces;
    person bigint;
BEGIN
    PERFORM listener.lock_owner_faces(p_owner);
    SELECT * INTO s FROM listener.face_suggestions AS x
    WHERE x.face_id = p_face_id AND x.candidate_face_id = p_candidate_face_id
    FOR UPDATE;
    IF NOT FOUND OR s.owner_id IS DISTINCT FROM p_owner THEN
        RAISE EXCEPTION 'no suggestion of face % for candidate % among the faces of owner %',
            p_face_id, p_candidate_face_id, coalesce(quote_literal(p_owner), 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM 1 FROM listener.faces AS x
    WHERE x.face_id IN (p_face_id, p_candidate_face_id)
    ORDER BY x.face_id
    FOR UPDATE;
    SELECT * INTO face FROM listener.faces AS x WHERE x.face_id = p_face_id;
    IF s.status = 'accepted' THEN
        RETURN face.person_id;
    END IF;
    SELECT * INTO candidate FROM listener.faces AS x WHERE x.face_id = p_candidate_face_id;
    IF NOT FOUND OR candidate.owner_id IS DISTINCT FROM p_owner THEN
        RAISE EXCEPTION 'candidate face % is no longer among the faces of owner %',
            p_candidate_face_id, coalesce(quote_literal(p_owner), 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;

    person := candidate.person_id;
    IF person IS NULL THEN
        INSERT INTO listener.people (owner_id, collection_id)
        VALUES (candidate.owner_id, candidate.collection_id)
        RETURNING id INTO person;
        UPDATE listener.faces SET person_id = person WHERE face_id = candidate.face_id;
    END IF;
    UPDATE listener.faces
    SET person_id = person, matched_face = candidate.face_id, similarity = s.similarity
    WHERE face_id = face.face_id;

    UPDATE listener.face_suggestions AS x
    SET status = 'accepted', decided_at = now(), person_id = person
    WHERE x.face_id = p_face_id AND x.candidate_face_id = p_candidate_face_id;
    UPDATE listener.face_suggestions AS x
    SET status = 'superseded', decided_at = now()
    WHERE x.face_id = p_face_id AND x.candidate_face_id <> p_candidate_face_id
      AND x.status = 'open';
    PERFORM listener.close_settled_suggestions(person);

    IF face.person_id IS NOT NULL AND face.person_id <> person AND NOT EXISTS (
        SELECT 1 FROM listener.faces AS x WHERE x.person_id = face.person_id
    ) THEN
        -- Suggestions keep their row; only the person they recorded goes.
        UPDATE listener.face_suggestions AS x SET person_id = NULL
        WHERE x.person_id = face.person_id;
        DELETE FROM listener.people WHERE id = face.person_id;
    END IF;
    RETURN person;
END;
$$;
REVOKE ALL ON FUNCTION listener.accept_suggestion(text, text, text) FROM PUBLIC;

-- reject_suggestion(owner, face, candidate): the face is not the candidate's person. Nothing
-- else changes (the face keeps whatever person it has). Returns true when the suggestion
-- became 'rejected', false when it already was. An accepted suggestion cannot be rejected
-- (object_not_in_prerequisite_state): the face was put in the person; accept another
-- suggestion of it, or merge people, instead.
CREATE FUNCTION listener.reject_suggestion(
    p_owner text, p_face_id text, p_candidate_face_id text
) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s listener.face_suggestions;
BEGIN
    SELECT * INTO s FROM listener.face_suggestions AS x
    WHERE x.face_id = p_face_id AND x.candidate_face_id = p_candidate_face_id
    FOR UPDATE;
    IF NOT FOUND OR s.owner_id IS DISTINCT FROM p_owner THEN
        RAISE EXCEPTION 'no suggestion of face % for candidate % among the faces of owner %',
            p_face_id, p_candidate_face_id, coalesce(quote_literal(p_owner), 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    IF s.status = 'rejected' THEN
        RETURN false;
    END IF;
    IF s.status = 'accepted' THEN
        RAISE EXCEPTION 'the suggestion of face % for candidate % was accepted', p_face_id,
            p_candidate_face_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'The face is in person ' || coalesce(s.person_id::text, '?')
                         || '; accept another of its suggestions or merge people instead.';
    END IF;
    UPDATE listener.face_suggestions AS x SET status = 'rejected', decided_at = now()
    WHERE x.face_id = p_face_id AND x.candidate_face_id = p_candidate_face_id;
    RETURN true;
END;
$$;
REVOKE ALL ON FUNCTION listener.reject_suggestion(text, text, text) FROM PUBLIC;

-- merge_people(owner, into, from): every face of the people `from` joins `into`, and those
-- people are deleted. `into` keeps its name, or takes the first name among `from` (in the
-- order given) when it has none. Open suggestions now inside `into` become 'superseded'.
-- Returns the faces moved. All people must be the owner's: otherwise nothing changes and the
-- error names the ids that are not (a merge retried after it succeeded names `from`, which
-- no longer exist). An empty `from` merges nothing (0).
CREATE FUNCTION listener.merge_people(p_owner text, p_into bigint, p_from bigint[])
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target listener.people;
    missing bigint[];
    first_name text;
    moved integer;
BEGIN
    IF p_into IS NULL THEN
        RAISE EXCEPTION 'merge into which person? (got NULL)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_from) > 1000 THEN
        RAISE EXCEPTION 'at most 1,000 people per merge (got %)', cardinality(p_from)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF p_into = ANY(p_from) THEN
        RAISE EXCEPTION 'person % cannot be merged into itself', p_into
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM listener.lock_owner_faces(p_owner);
    PERFORM 1 FROM listener.people AS p
    WHERE p.id = p_into OR p.id = ANY(p_from)
    ORDER BY p.id
    FOR UPDATE;
    SELECT array_agg(DISTINCT w.id ORDER BY w.id) INTO missing
    FROM unnest(array_append(coalesce(p_from, '{}'), p_into)) AS w(id)
    WHERE w.id IS NULL OR NOT EXISTS (
        SELECT 1 FROM listener.people AS p
        WHERE p.id = w.id AND p.owner_id IS NOT DISTINCT FROM p_owner
    );
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'not among the people of owner %: %',
            coalesce(quote_literal(p_owner), 'NULL'), array_to_string(missing, ', ', 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    IF coalesce(cardinality(p_from), 0) = 0 THEN
        RETURN 0;
    END IF;

    SELECT * INTO target FROM listener.people WHERE id = p_into;
    IF target.name IS NULL THEN
        SELECT p.name INTO first_name
        FROM unnest(p_from) WITH ORDINALITY AS w(id, n)
        JOIN listener.people AS p ON p.id = w.id
        WHERE p.name IS NOT NULL
        ORDER BY w.n
        LIMIT 1;
        IF first_name IS NOT NULL THEN
            UPDATE listener.people SET name = first_name WHERE id = p_into;
        END IF;
    END IF;

    UPDATE listener.faces SET person_id = p_into WHERE person_id = ANY(p_from);
    GET DIAGNOSTICS moved = ROW_COUNT;
    UPDATE listener.face_suggestions SET person_id = p_into WHERE person_id = ANY(p_from);
    DELETE FROM listener.people WHERE id = ANY(p_from);
    PERFORM listener.close_settled_suggestions(p_into);
    RETURN moved;
END;
$$;
REVOKE ALL ON FUNCTION listener.merge_people(text, bigint, bigint[]) FROM PUBLIC;

-- rename_person(owner, person, name): names the person; NULL or a blank name clears it. The
-- name is trimmed; at most 200 characters, no control characters. Returns the name stored.
CREATE FUNCTION listener.rename_person(p_owner text, p_person bigint, p_name text)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cleaned text := nullif(btrim(p_name), '');
BEGIN
    IF cleaned ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'a name cannot contain control characters (tabs, line breaks, ...)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(cleaned) > 200 THEN
        RAISE EXCEPTION 'a name has at most 200 characters (got %)', length(cleaned)
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    UPDATE listener.people AS p SET name = cleaned
    WHERE p.id = p_person AND p.owner_id IS NOT DISTINCT FROM p_owner;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'person % is not among the people of owner %', p_person,
            coalesce(quote_literal(p_owner), 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN cleaned;
END;
$$;
REVOKE ALL ON FUNCTION listener.rename_person(text, bigint, text) FROM PUBLIC;
