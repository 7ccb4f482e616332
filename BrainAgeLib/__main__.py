import sys

from .cli import main

# The guard matters: worker processes started with "spawn" (batch preprocessing, data loaders)
# import the parent's __main__ module again, and must not run the command a second time.
if __name__ == "__main__":
    sys.exit(main())
