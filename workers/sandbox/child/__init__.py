"""What runs on the sandbox's interpreter, standard library only: the zygote (`zygote.py`,
with `kernel.py` and `slots.py`) and the Python bootstrap (`bootstrap.py`)."""
