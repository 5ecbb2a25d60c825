"""Workers: the broker port, dispatcher, consumer, reaper, executors and sandbox."""
