"""A process for the launcher test: process 1 fails at once, process 0 would run for 10 minutes."""
import os
import sys
import time

if os.environ.get("JAX_PROCESS_ID") == "1":
    print("probe: process 1 fails", flush=True)
    sys.exit(3)
time.sleep(600)
