"""`python -m comigs_jax.capacity`: the capacity plan of a config (comigs_jax.capacity.command)."""
import sys

from comigs_jax import cli
from comigs_jax.capacity.command import main

cli.install_process_hooks()
sys.exit(main())
