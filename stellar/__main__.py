"""`python -m stellar ...` is the `stellar` command."""
import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main())
