"""distgn: a distributed GroupNorm (Flax's flax.linen.GroupNorm semantics).

``distgn.torch`` is the PyTorch module (``import distgn.torch as dgn``);
``distgn._distgn`` the C++ layer it calls.
"""

__version__ = "0.1.0"
