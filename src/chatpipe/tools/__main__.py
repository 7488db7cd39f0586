import asyncio
import logging

from chatpipe.tools.executor import main

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
asyncio.run(main())
