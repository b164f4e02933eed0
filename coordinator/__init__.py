"""The coordinator daemon: registry, scheduler, rounds, aggregation, store, operations."""
