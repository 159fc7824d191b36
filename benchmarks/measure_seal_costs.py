#!/usr/bin/env python3
"""Measure the SEAL cost table (op latencies per level, key sizes, noise, baseline memory).

Writes hecompiler/data/cost_seal.json (the table bundled with the compiler) by default;
``hecompile calibrate`` runs the same measurement, quick, into the user's cache.  The
measurement and its JSON schema live in hecompiler/backends/seal_costs.py.
"""

import sys

from hecompiler.backends.seal_costs import main

if __name__ == "__main__":
    sys.exit(main())
