-- 0018_faces_replaced: a faces step replaces the faces its row had.
--
-- A row analyzed again (listener.reanalyze, `listener reanalyze`) or whose URL changed (a new
-- image) runs its faces step again, and the faces recorded for the row by the earlier run stay
-- in listener.faces and in the owner's collection: a retag added a second record of each face,
-- and the faces of a replaced photo stayed recognisable. Now the step deletes the row's
-- recorded faces from their collection before it indexes the image (so the new faces cannot
-- match the old ones), and apply_face_effects, in the fenced transaction that stores the step,
-- deletes the row's face records that the new run did not index, as forget_faces (0014) does
-- for deleted rows: suggestions about them cascade, suggestions naming them as the candidate
-- go, and faces matched to them forget the match. A run that dies between the DeleteFaces and
-- the store leaves records of faces already gone from the collection; the next run deletes
-- them again (Rekognition reports faces already gone as unsuccessful deletions) and replaces
-- them. Decisions made by hand about the old faces (accepted suggestions) do not carry over:
-- the new faces are matched and decided afresh.

-- apply_face_effects: as in 0015, and the row's other face records are deleted first.
CREATE OR REPLACE FUNCTION listener.apply_face_effects(
    p_job_id bigint, p_source_table text, p_source_id text, p_owner_id text, p_effect jsonb
) RETURNS jsonb
LANGUAGE plpgsql AS $$
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
