#!/usr/bin/env python
"""milan-bench: `python bench.py --help` lists the commands (also installed as `milan-bench`)."""

from harness.cli import main

if __name__ == "__main__":
    main()
