"""kvpolicy-keydiversity: an example third-party kvpolicy plugin."""
