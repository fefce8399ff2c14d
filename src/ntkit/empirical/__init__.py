"""The empirical NTK and NNGP of any PyTorch model.

The empirical NTK is ``Theta(x1, x2) = J(x1) J(x2)^T``, where ``J(x)`` is the
Jacobian of the model's outputs with respect to its trainable parameters at
their current values. Three exact methods are offered, all with `torch.func`
over chunks of inputs that fit a memory budget:

- ``"jacobian"``: per-example Jacobians, contracted parameter by parameter;
- ``"structured"``: for the weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``
  layers, the Jacobian of example ``i``'s output ``a`` is an outer product
  summed over positions, ``dW = sum_p g[i, a, p] (x) u[i, p]``, of the
  cotangent ``g`` at the layer's output and the layer's input ``u`` (a patch
  of it for a convolution). Its contribution is then either
  ``sum_{p,q} <g_iap, g_jbq> <u_ip, u_jq>`` (two Gram matrices, never forming
  the Jacobian: what makes wide dense layers cheap) or the product of the
  Jacobians formed from ``g`` and ``u``, whichever costs fewer operations for
  the shapes at hand. Only the cotangents at layer outputs are
  back-propagated. Every other parameter goes through ``"jacobian"``;
- ``"vector_products"``: ``J(x1) (J(x2)^T e)`` for each output basis vector
  ``e`` of ``x2`` (a vector-Jacobian then a Jacobian-vector product), which
  never holds a Jacobian but costs a forward-mode pass per pair of examples.

The structured rule is only trusted where it is checked: before use, the
weight gradients it implies for one example and a random output direction are
compared with autograd's. A layer whose weight is also used outside its own
forward (tied weights, ``F.linear(x, layer.weight)``) fails that check and
goes through ``"jacobian"`` instead.

``method="auto"`` takes ``"structured"`` only where its Gram or per-channel
contractions promise to save a quarter of ``"jacobian"``'s operations (wide dense
layers, convolutions before a global pooling), else ``"jacobian"`` (small
transformers, whose layers cost as much either way and where the structured check
would be pure overhead), and ``"vector_products"`` past the memory budget.

Layout: `_ntk` (the public NTK calls), `_choice` (the engine a call runs on), `_nngp`,
`_problem` (argument checks), `_tiles` (chunks of examples and outputs, the
symmetric path), `_structured` (Linear/Conv sites), `_jacobian` and
`_vector_products` (the two engines).
"""

from ._nngp import empirical_nngp
from ._ntk import empirical_ntk, empirical_ntk_by_layer

__all__ = ["empirical_nngp", "empirical_ntk", "empirical_ntk_by_layer"]
