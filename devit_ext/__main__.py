"""`python -m devit_ext ...` and `torchrun --nproc_per_node K -m devit_ext train RUN ...`: the devit-ext command."""
import sys

from .cli import main

sys.exit(main())
