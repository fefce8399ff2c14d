"""nk.empirical_ntk of models with torch's recurrent modules (nn.RNN, nn.GRU, nn.LSTM).

torch.func.vmap cannot batch those modules' fused kernels over examples (it failed
with a raw broadcast error for every method); the engines now take such models one
example at a time. Witness: the explicit Jacobian of each example's outputs with
respect to the model's own parameters, one ``torch.autograd.grad`` per output on the
real module (no torch.func, no functional_call), contracted by a plain einsum.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkit as nk

METHODS = ("jacobian", "structured", "vector_products", "auto")
CELLS = {"rnn_tanh": lambda i, h, **k: nn.RNN(i, h, **k),
         "rnn_relu_2layers": lambda i, h, **k: nn.RNN(i, h, nonlinearity="relu",
                                                       num_layers=2, **k),
         "gru": lambda i, h, **k: nn.GRU(i, h, **k),
         "gru_bidirectional": lambda i, h, **k: nn.GRU(i, h, bidirectional=True, **k),
         "lstm": lambda i, h, **k: nn.LSTM(i, h, **k),
         "lstm_2layers_proj": lambda i, h, **k: nn.LSTM(i, h, num_layers=2, proj_size=3, **k)}
# relative tolerance of the kernel against the explicit product, by dtype
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


class LastStep(nn.Module):
    """A recurrent module, then a Linear readout of its last step's output."""

    def __init__(self, kind: str, batch_first: bool, dtype: torch.dtype):
        super().__init__()
        self.rnn = CELLS[kind](3, 6, batch_first=batch_first, dtype=dtype)
        width = self.rnn.proj_size or self.rnn.hidden_size
        width *= 2 if self.rnn.bidirectional else 1
        self.readout = nn.Linear(width, 2, dtype=dtype)
        self.batch_first = batch_first

    def forward(self, x):
        y, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.readout(y[:, -1] if self.batch_first else y[-1])


def _model(kind, batch_first, dtype):
    torch.manual_seed(0)
    return LastStep(kind, batch_first, dtype)


def _explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, O, P): rows of ``d out[i, a] / d theta`` by autograd on the module itself."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        per = []
        for a in range(out.shape[0]):
            g = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                  for gi, p in zip(g, params)]))
        rows.append(torch.stack(per))
    return torch.stack(rows)


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(4, 5, 3, generator=g, dtype=dtype)
    x2 = torch.randn(3, 5, 3, generator=g, dtype=dtype)
    return x1, x2


def _close(got, want, dtype):
    scale = want.abs().max()
    err = (got - want).abs().max()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "lstm"])
def test_every_method_equals_the_explicit_jacobian_product(kind, batch_first, dtype):
    model = _model(kind, batch_first, dtype)
    x1, x2 = _inputs(dtype)
    j1, j2 = _explicit_jacobian(model, x1), _explicit_jacobian(model, x2)
    full12 = torch.einsum("iak,jbk->ijab", j1, j2)
    full11 = torch.einsum("iak,jbk->ijab", j1, j1)
    for method in METHODS:
        _close(nk.empirical_ntk(model, x1, x2, output="full", method=method), full12, dtype)
        got = nk.empirical_ntk(model, x1, method=method, output="full")
        _close(got, full11, dtype)
        assert torch.equal(got, got.transpose(0, 1).transpose(2, 3))


@pytest.mark.parametrize("kind", ["rnn_relu_2layers", "gru_bidirectional",
                                  "lstm_2layers_proj"])
def test_stacked_and_bidirectional_modules_every_output(kind):
    dtype = torch.float64
    model = _model(kind, True, dtype)
    x1, x2 = _inputs(dtype)
    full12 = torch.einsum("iak,jbk->ijab", _explicit_jacobian(model, x1),
                          _explicit_jacobian(model, x2))
    for method in METHODS:
        _close(nk.empirical_ntk(model, x1, x2, method=method), torch.einsum("ijaa->ij", full12),
               dtype)
        _close(nk.empirical_ntk(model, x1, x2, method=method, output="diagonal"),
               torch.einsum("ijaa->ija", full12), dtype)


@pytest.mark.parametrize("method", METHODS)
def test_parts_by_module_sum_to_the_kernel_and_match_their_parameters(method):
    model = _model("lstm", True, torch.float64)
    x1, x2 = _inputs(torch.float64)
    parts = nk.empirical_ntk_by_layer(model, x1, x2, method=method, by="module")
    assert sorted(parts) == ["readout", "rnn"]
    j1 = _explicit_jacobian(model, x1)
    j2 = _explicit_jacobian(model, x2)
    n_rnn = sum(p.numel() for p in model.rnn.parameters())
    rnn = torch.einsum("iak,jak->ij", j1[..., :n_rnn], j2[..., :n_rnn])
    _close(parts["rnn"], rnn, torch.float64)
    _close(parts["rnn"] + parts["readout"], torch.einsum("iak,jak->ij", j1, j2), torch.float64)


def test_a_small_budget_chunks_the_examples_with_the_same_result():
    model = _model("gru", False, torch.float64)
    x1, x2 = _inputs(torch.float64)
    whole = nk.empirical_ntk(model, x1, x2, output="full")
    for method in METHODS:
        chunked = nk.empirical_ntk(model, x1, x2, output="full", method=method,
                                   memory_budget=16384)
        _close(chunked, whole, torch.float64)


def test_cells_in_a_python_loop():
    """nn.GRUCell / nn.LSTMCell unrolled by hand (vmap cannot batch those either)."""

    class Unrolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.LSTMCell(3, 5, dtype=torch.float64)
            self.out = nn.Linear(5, 1, dtype=torch.float64)

        def forward(self, x):                      # x (N, L, C)
            h = c = x.new_zeros(x.shape[0], 5)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
            return self.out(h)

    torch.manual_seed(0)
    model = Unrolled()
    x1, x2 = _inputs(torch.float64)
    want = torch.einsum("iak,jak->ij", _explicit_jacobian(model, x1),
                        _explicit_jacobian(model, x2))
    for method in METHODS:
        _close(nk.empirical_ntk(model, x1, x2, method=method), want, torch.float64)


def test_the_witness_detects_a_wrong_kernel():
    """The comparison can fail: another model's parameters give another kernel."""
    model = _model("gru", True, torch.float64)
    x1, x2 = _inputs(torch.float64)
    want = torch.einsum("iak,jak->ij", _explicit_jacobian(model, x1),
                        _explicit_jacobian(model, x2))
    other = _model("gru", True, torch.float64)
    with torch.no_grad():
        other.rnn.weight_hh_l0.mul_(1.01)
    with pytest.raises(AssertionError):
        _close(nk.empirical_ntk(other, x1, x2), want, torch.float64)
