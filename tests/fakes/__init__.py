"""Local stand-ins for remote services, reached through the real SDKs in tests."""
