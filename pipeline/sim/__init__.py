"""Simulated input: the event simulator, the producer that sends it to Kafka (or a file), and the
training corpus built from simulated windows."""
