"""Helpers for testing the gateway and plugins against real servers on 127.0.0.1.

Importable by plugin authors: ``sign_headers`` signs bodies as Meta does, ``GatewayProcess`` runs
``gateway serve`` as a subprocess (to test crash behaviour), ``free_port`` finds a port.
"""

from __future__ import annotations

from gateway.testing.client import free_port, sign_headers, wait_http
from gateway.testing.process import GatewayProcess

__all__ = ["GatewayProcess", "free_port", "sign_headers", "wait_http"]
