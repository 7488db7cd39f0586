from chatpipe.runtime import run_service
from chatpipe.tools.executor import main

run_service(main)
