"""Database access: migrations, named queries, the LISTEN connection, throwaway clusters."""
