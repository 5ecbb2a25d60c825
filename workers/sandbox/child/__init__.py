"""What runs on the sandbox's interpreter, standard library only: the zygote (`zygote.py`,
with `kernel.py`, `slots.py` and `runner.py`, its forked runs) and the Python bootstrap
(`bootstrap.py`)."""
