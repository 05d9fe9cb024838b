"""Analysis providers: the ``Provider`` protocol and its implementations."""
