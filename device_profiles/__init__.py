"""Device profiles: reference hardware figures, on-device benchmark, and the cost model."""
