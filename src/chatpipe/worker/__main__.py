from chatpipe.runtime import run_service
from chatpipe.worker.service import main

run_service(main)
