"""The app's side: what reaches the attached table and the app (status write-back,
events and webhooks, deletes, backfill, re-analysis, face review)."""
