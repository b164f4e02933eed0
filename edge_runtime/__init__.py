"""The on-device agent: config, enrollment, eligibility, trainer, outbox, secure sessions and
the `schoolfl agent` commands.

What the agent shares with the coordinator lives in the two sub-packages below it:
`edge_runtime.wire` (the protocol) and `edge_runtime.secagg` (secure aggregation). The
coordinator imports only those two; the modules at this level are the agent alone.
"""
