"""Talking to Kafka: the clients built from the settings, the start-up and mid-run broker checks,
the embedded local broker for the demo, and how input positions are named."""
