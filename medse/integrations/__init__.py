"""Integrations of medse's attention blocks into other frameworks (optional extras).

Each sub-package imports its host framework only when used, so ``import medse`` keeps working without them:
``medse.integrations.nnunet`` (extra ``medse[nnunet]``) puts medse blocks into nnU-Net v2's own networks.
"""
