"""The kit's own profiles: ``ci`` (derandomised, bounded) when $CI is set, else ``dev``."""

from kvpolicy.testing import load_profile

load_profile()
