"""The papers' experiments, one command each: ``python experiments/reproduce.py
multiple_tickets|subnetworks|predicted_masks|all --scale quick|cpu|paper`` (the same as
``python -m sparsejax.reproduce``; ``--help`` lists the flags)."""

import sys

from sparsejax.reproduce.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
