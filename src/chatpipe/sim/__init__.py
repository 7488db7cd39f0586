"""Simulators for the external services that cannot run here: an OpenAI-compatible LLM
provider and Somabrain. Both speak their HTTP protocol and take faults at run time
through ``POST /control`` (latency, errors, timeouts, outage), so every metric of the
pipeline can be driven by real behaviour."""
