"""Several relay processes: workers on one node, and the NATS bus between relays."""
