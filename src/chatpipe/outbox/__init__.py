"""Outbox publisher (PostgreSQL outbox -> Kafka WAL) and memory replicator (WAL -> PostgreSQL)."""
