"""Every registered network against the network contract (:class:`tests.contracts.NetworkContract`)."""

from tests.contracts import NetworkContract


class TestNetworks(NetworkContract):
    """Cases from ``list_models()``; user networks in ``MEDSE_PLUGINS`` are included."""
