"""The gRPC service: the servicer and what it calls, and the seams (store, runner)."""
