"""Every registered attention block against the block contract (:class:`tests.contracts.BlockContract`)."""

from tests.contracts import BlockContract


class TestBlocks(BlockContract):
    """Cases from ``list_attention()``; user blocks in ``MEDSE_PLUGINS`` are included."""
