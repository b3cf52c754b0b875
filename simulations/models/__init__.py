"""The SimPy models: who does what, when.

* :mod:`.market`: buyers open escrows with sellers (Poisson arrivals) and take
  them through their lives; honest, slow, exit-scam and fraudulent sellers.
* :mod:`.gateway`: M-Pesa (Daraja) answering STK pushes in virtual time.
* :mod:`.phones`: app users whose SSE connections keep dropping.
* :mod:`.supervision`: serve's supervisor deciding when a killed process is back.
* :mod:`.clock`: the runtime's clock reading SimPy's ``env.now``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from simulations.models.clock import SimClock
    from simulations.models.gateway import MpesaGateway
    from simulations.models.market import Market
    from simulations.models.phones import Phone, ServerPool
    from simulations.models.supervision import SupervisedRestarts

__all__ = [
    "Market",
    "MpesaGateway",
    "Phone",
    "ServerPool",
    "SimClock",
    "SupervisedRestarts",
]
__getattr__ = lazy(
    __name__,
    {
        "Market": "market",
        "MpesaGateway": "gateway",
        "Phone": "phones",
        "ServerPool": "phones",
        "SimClock": "clock",
        "SupervisedRestarts": "supervision",
    },
)
