"""SimPy load models that drive the real escrow runtime.

The models (market, M-Pesa gateway, phones, faults) decide *when* things
happen; the runtime's own code (``workbench``) decides *what* happens, against
a real Redis and a real SQL store. Nothing of the runtime is re-implemented
here.
"""
