"""chatpipe: the chat pipeline that chatobs instruments.

The services (:mod:`chatpipe.gateway`, :mod:`chatpipe.worker`, :mod:`chatpipe.outbox`'s
publisher and replicator, :mod:`chatpipe.tools`), the simulators of the external LLM
provider and Somabrain (:mod:`chatpipe.sim`), and :mod:`chatpipe.launcher`, which runs
them all as processes (``chatobs demo`` does, on the embedded local stack).
"""

__all__: list[str] = []
