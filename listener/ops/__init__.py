"""Operations: health and metrics endpoint, status, status page, logs, tracing."""
