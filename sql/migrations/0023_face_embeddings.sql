-- 0023_face_embeddings: faces found offline. The local provider's faces step embeds each face
-- (dlib's ResNet, 128 floats; listener/analysis/providers/local_faces.py) and searches the
-- owner's collection for the nearest faces (the nearest_faces query). The embeddings live in
-- listener.faces beside the faces Rekognition indexed (whose embedding stays NULL: Rekognition
-- keeps its own), so people, suggestions, the review functions, deletes and re-analysis work
-- the same for both. The search reads one collection: faces_collection_idx.

ALTER TABLE listener.faces ADD COLUMN embedding real[]
    CONSTRAINT faces_embedding_check
    CHECK (embedding IS NULL OR (array_ndims(embedding) = 1
                                 AND cardinality(embedding) BETWEEN 1 AND 4096));
CREATE INDEX faces_collection_idx ON listener.faces (collection_id);

-- apply_face_effects(job, source table, source id, owner, effect): records the faces of one
-- image and acts on their decisions, in the caller's transaction. `effect`: {"collection_id",
-- "faces": [{"face_id", "bounding_box", "confidence", "decision": "assigned" | "suggested" |
-- "new", "matched_face_id", "similarity", "embedding"?}, ...]}; "embedding", an array of
-- numbers, comes from the local provider's faces step (listener.faces.embedding). The row's
-- face records from an earlier analysis (re-analysis, a new image) that this run did not
-- index are deleted first, as forget_faces does. Matched faces are locked in face_id order
-- (no deadlock between images matching the same faces in different orders). Idempotent.
-- Returns {face_id: person_id}.
CREATE OR REPLACE FUNCTION listener.apply_face_effects(
    p_job_id bigint, p_source_table text, p_source_id text, p_owner_id text, p_effect jsonb
) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    face jsonb;
    person bigint;
    people jsonb := '{}'::jsonb;
    replaced text[];
BEGIN
    IF EXISTS (
        SELECT 1 FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb)) AS f
        WHERE f->>'decision' IN ('assigned', 'suggested')
    ) OR EXISTS (
        SELECT 1 FROM listener.faces AS r
        WHERE r.source_table = p_source_table AND r.source_id = p_source_id
    ) THEN
        PERFORM listener.lock_owner_faces(p_owner_id);
    END IF;

    -- The row's faces from an earlier analysis, which this run replaces.
    WITH d AS (
        DELETE FROM listener.faces AS r
        WHERE r.source_table = p_source_table AND r.source_id = p_source_id
          AND r.face_id NOT IN (
              SELECT f->>'face_id'
              FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb)) AS f)
        RETURNING r.face_id
    )
    SELECT coalesce(array_agg(d.face_id), '{}') INTO replaced FROM d;
    IF cardinality(replaced) > 0 THEN
        DELETE FROM listener.face_suggestions AS s WHERE s.candidate_face_id = ANY(replaced);
        UPDATE listener.faces AS f SET matched_face = NULL, similarity = NULL
        WHERE f.matched_face = ANY(replaced);
    END IF;

    INSERT INTO listener.faces
        (face_id, collection_id, owner_id, job_id, source_table, source_id, bounding_box,
         confidence, embedding)
    SELECT f->>'face_id', p_effect->>'collection_id', p_owner_id, p_job_id, p_source_table,
           p_source_id, f->'bounding_box', (f->>'confidence')::float8,
           CASE WHEN jsonb_typeof(f->'embedding') = 'array' THEN
               ARRAY(SELECT e::float4
                     FROM jsonb_array_elements_text(f->'embedding') WITH ORDINALITY AS x(e, n)
                     ORDER BY x.n)
           END
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
