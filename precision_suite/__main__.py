"""``python -m precision_suite`` is the ``precision-suite`` command."""

from .cli import console_main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    console_main()
