#!/usr/bin/env python3
"""`icmem ...` for gpu/train.sh, also where the store's dependencies are missing.

The device machine has torch, transformers, peft and accelerate but neither sqlalchemy nor
faiss. Building icmem's parser imports neither (a command imports what it needs when it runs),
so `icmem train ...` works there as it is. Run this as a script
(`python3 gpu/icmem_cli.py train pretrain --config ...`), not with `-m` from the checkout's
root: there the bare `icmem/` folder, without `store/`, would shadow the installed package.
"""

from __future__ import annotations

import sys

from icmem.cli import main

if __name__ == "__main__":
    sys.exit(main())
