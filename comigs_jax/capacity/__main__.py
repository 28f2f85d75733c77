"""`python -m comigs_jax.capacity`: the capacity plan of a config (comigs_jax.capacity.command)."""
import sys

from comigs_jax.capacity.command import console

sys.exit(console())
