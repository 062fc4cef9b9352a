"""``python -m elasticize``: the command line (also ``torchrun --nproc_per_node N -m elasticize train ...``)."""

from .cli import main

main(prog_name="elasticize")
