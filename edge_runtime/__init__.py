"""The on-device agent: config, enrollment, eligibility, trainer, outbox, and the wire
protocol and MQTT transport that both the agent and the coordinator share."""
