"""The coordinator daemon: store, scheduler, rounds, aggregation, privacy, school policies and
operations (`schoolfl coordinator`); secure rounds in `coordinator.secure`, the fleet simulator
in `coordinator.simulation`."""
