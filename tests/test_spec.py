"""ntkit.spec: compact architecture strings and JSON/YAML layer lists, and their inverse."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ntkit as nk
from ntkit.spec import LAYERS, parse_architecture, to_spec

GEN = torch.Generator().manual_seed(0)
X_DENSE = torch.randn(6, 5, generator=GEN, dtype=torch.float64)
X_IMAGE = torch.randn(4, 2, 6, 6, generator=GEN, dtype=torch.float64)
X_SEQ = torch.randn(4, 3, 7, generator=GEN, dtype=torch.float64)


def assert_same_kernel(a: nk.Layer, b: nk.Layer, x: torch.Tensor) -> None:
    ka, kb = a.kernel(x), b.kernel(x)
    torch.testing.assert_close(ka.nngp, kb.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ka.ntk, kb.ntk, rtol=1e-12, atol=1e-12)


# spec string, hand-built twin, inputs
HAND_BUILT = {
    "mlp": ("linear(512)-relu-linear(512)-relu-linear(10)",
            nk.Sequential(nk.Linear(512), nk.ReLU(), nk.Linear(512), nk.ReLU(), nk.Linear(10)),
            X_DENSE),
    "mlp_hyper_case_spaces": (
        " Linear(64, w_std=1.5, b_std=0.1) - ReLU - LINEAR(1, w_std = 1.5, b_std=0.1) ",
        nk.Sequential(nk.Linear(64, w_std=1.5, b_std=0.1), nk.ReLU(),
                      nk.Linear(1, w_std=1.5, b_std=0.1)), X_DENSE),
    "cnn_flatten": ("conv2d(64,3,padding=same)-relu-avgpool2d(2)-flatten-linear(10)",
                    nk.Sequential(nk.Conv2d(64, 3, padding="same"), nk.ReLU(), nk.AvgPool2d(2),
                                  nk.Flatten(), nk.Linear(10)), X_IMAGE),
    "cnn_gap": (("conv2d(8, (3, 3), stride=1, padding=1, w_std=1.4, b_std=0.1)-gelu"
                "-global_avg_pool-linear(3)"),
                nk.Sequential(nk.Conv2d(8, 3, padding=1, w_std=1.4, b_std=0.1), nk.GELU(),
                              nk.GlobalAvgPool(), nk.Linear(3)), X_IMAGE),
    "conv1d_sumpool": (("conv1d(4,3,padding=valid,b_std=none)-erf(a=2,b=0.5)-sumpool1d(2)"
                       "-globalsumpool-linear(2)"),
                       nk.Sequential(nk.Conv1d(4, 3, b_std=None), nk.Erf(a=2, b=0.5),
                                     nk.SumPool1d(2), nk.GlobalSumPool(), nk.Linear(2)), X_SEQ),
    "repeat": ("3*(linear(32,w_std=1.5,b_std=0.1)-relu)-linear(1)",
               nk.Sequential(nk.Repeat(nk.Sequential(nk.Linear(32, w_std=1.5, b_std=0.1),
                                                     nk.ReLU()), 3), nk.Linear(1)), X_DENSE),
    "layernorm_standard": (("dense(16,parameterization=standard)-layer_norm-sin(a=1.5,c=0.3)"
                           "-linear(1)"),
                           nk.Sequential(nk.Linear(16, parameterization="standard"),
                                         nk.LayerNorm(), nk.Sin(a=1.5, c=0.3), nk.Linear(1)),
                           X_DENSE),
}


@pytest.mark.parametrize("case", list(HAND_BUILT), ids=list(HAND_BUILT))
def test_parsed_kernel_equals_hand_built(case):
    """A parsed spec has exactly the kernel of the same network written in Python."""
    spec, net, x = HAND_BUILT[case]
    assert_same_kernel(parse_architecture(spec), net, x)


def test_every_activation_has_a_name():
    """Every activation ntkit exports (except the numerical Elementwise) parses by name, and
    a wrong activation gives a different kernel (the witness can fail)."""
    exported = {name.lower() for name in nk.__all__
                if isinstance(getattr(nk, name), type)
                and issubclass(getattr(nk, name), nk.Activation)}
    exported -= {"activation", "elementwise"}
    assert exported <= set(LAYERS), exported - set(LAYERS)
    relu = parse_architecture("linear(8)-relu-linear(1)").kernel(X_DENSE)
    gelu = parse_architecture("linear(8)-gelu-linear(1)").kernel(X_DENSE)
    assert not torch.allclose(relu.ntk, gelu.ntk)


ROUND_TRIP = {
    "mlp": nk.Sequential(nk.Linear(512, w_std=1.5, b_std=0.1), nk.ReLU(), nk.Linear(1)),
    "irrational_std": nk.Sequential(nk.Linear(7, w_std=math.sqrt(2), b_std=1 / 3),
                                    nk.Erf(b=math.pi), nk.Linear(1, b_std=None)),
    "activations": nk.Sequential(
        nk.Linear(8), nk.LeakyReLU(0.2), nk.Linear(8), nk.ABReLU(-0.5, 2.0), nk.Linear(8),
        nk.Abs(), nk.Linear(8), nk.Cos(a=2.0, c=0.25), nk.Linear(8), nk.Rbf(gamma=0.5),
        nk.Linear(8), nk.Gaussian(a=0.7, b=-0.3), nk.Linear(8), nk.Exp(a=0.5, b=0.2),
        nk.Linear(8), nk.Monomial(2), nk.Linear(8), nk.RectifiedMonomial(1), nk.Linear(8),
        nk.Sign(), nk.Linear(1)),
    "dropout_layernorm": nk.Sequential(nk.Linear(8), nk.ReLU(), nk.Dropout(0.25),
                                       nk.Linear(8), nk.LayerNorm(eps=1e-3), nk.Linear(1)),
    "cnn": nk.Sequential(nk.Conv2d(4, (3, 2), stride=(1, 2), padding="same", w_std=1.3),
                         nk.ReLU(), nk.AvgPool2d(2, stride=1, padding=1,
                                                 count_include_pad=False),
                         nk.Conv2d(4, 3, padding="circular"), nk.ReLU(), nk.Flatten(),
                         nk.Linear(2, parameterization="standard", b_std=0.2)),
    "repeat_nested": nk.Sequential(nk.Repeat(nk.Sequential(nk.Linear(8), nk.GELU()), 2),
                                   nk.Sequential(nk.Linear(4), nk.Identity()), nk.Linear(1)),
    "tensor_hyperparameter": nk.Sequential(
        nk.Linear(8, w_std=torch.tensor(1.25, requires_grad=True)), nk.ReLU(), nk.Linear(1)),
}
ROUND_TRIP_X = {"cnn": X_IMAGE}


@pytest.mark.parametrize("case", list(ROUND_TRIP), ids=list(ROUND_TRIP))
def test_round_trip(case):
    """parse(to_spec(net)) has net's kernel, and to_spec of it is the same string."""
    net = ROUND_TRIP[case]
    spec = to_spec(net)
    again = parse_architecture(spec)
    x = ROUND_TRIP_X.get(case, X_DENSE)
    ka, kb = net.kernel(x), again.kernel(x)
    torch.testing.assert_close(ka.nngp.detach(), kb.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ka.ntk.detach(), kb.ntk, rtol=1e-12, atol=1e-12)
    assert to_spec(again) == spec


def test_to_spec_is_compact():
    """Defaults are left out; a repeat stays a repeat."""
    net = nk.Sequential(nk.Repeat(nk.Sequential(nk.Linear(512), nk.ReLU()), 3), nk.Linear(10))
    assert to_spec(net) == "3*(linear(512)-relu)-linear(10)"
    assert to_spec(nk.Conv2d(64, 3, padding="same")) == "conv2d(64,3,padding=same)"


@pytest.mark.parametrize("net", [
    nk.Sequential(nk.Linear(8), nk.FanOut(2), nk.Parallel(nk.ReLU(), nk.Identity()),
                  nk.FanInSum()),
    nk.Sequential(nk.Linear(8), nk.Elementwise(torch.tanh), nk.Linear(1)),
], ids=["residual", "elementwise"])
def test_to_spec_refuses_what_the_grammar_lacks(net):
    with pytest.raises(ValueError, match="no compact spec form"):
        to_spec(net)


# ------------------------------------------------------------------- files and lists
LAYER_LIST = [
    {"repeat": 2, "layers": [{"layer": "Linear", "args": [32],
                              "kwargs": {"w_std": 1.5, "b_std": 0.1}}, "relu"]},
    {"layer": "linear", "args": [1]},
]
LIST_TWIN = nk.Sequential(nk.Repeat(nk.Sequential(nk.Linear(32, w_std=1.5, b_std=0.1),
                                                  nk.ReLU()), 2), nk.Linear(1))


def test_json_file_and_dict(tmp_path):
    """A JSON file (path object or string) and the loaded dict give the hand-built kernel."""
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"layers": LAYER_LIST}))
    for spec in (path, str(path), {"layers": LAYER_LIST}, LAYER_LIST):
        assert_same_kernel(parse_architecture(spec), LIST_TWIN, X_DENSE)


def test_yaml_file_with_tuples(tmp_path):
    """YAML lists become tuples (kernel sizes); string items use the compact grammar."""
    path = tmp_path / "cnn.yml"
    path.write_text("layers:\n"
                    "  - layer: conv2d\n    args: [4, [3, 3]]\n    kwargs: {padding: same}\n"
                    "  - relu\n  - avgpool2d(2)\n  - flatten\n  - linear(2)\n")
    twin = nk.Sequential(nk.Conv2d(4, 3, padding="same"), nk.ReLU(), nk.AvgPool2d(2),
                         nk.Flatten(), nk.Linear(2))
    assert_same_kernel(parse_architecture(path), twin, X_IMAGE)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        parse_architecture(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": [{"layer": "linear", "args": [8]}, {"layer": "relux"}]}')
    with pytest.raises(ValueError, match=r"layers\[1\]: unknown layer 'relux'.*known layers"):
        parse_architecture(bad)
    bad.write_text('{"layers": [{"layer": "linear", "args": [8], "kwarg": {}}]}')
    with pytest.raises(ValueError, match=r"layers\[0\]: expected the keys"):
        parse_architecture(bad)
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_architecture(bad)
    with pytest.raises(ValueError, match=r"layers\[0\]: linear: .*unexpected keyword"):
        parse_architecture([{"layer": "linear", "args": [8], "kwargs": {"w_sd": 1}}])


# ------------------------------------------------------------------- string errors
def caret_column(message: str) -> tuple[int, int]:
    """(start, length) of the caret run under the echoed spec, in spec characters."""
    line = next(ln for ln in message.splitlines() if set(ln.strip()) == {"^"})
    start = len(line) - len(line.lstrip()) - 2
    return start, len(line.strip())


@pytest.mark.parametrize("spec,position,length,words", [
    ("linear(512)-rleu-linear(10)", 12, 4, ["unknown layer 'rleu'", "known layers", "relu"]),
    ("linear(512, w_sd=1.0)-relu", 12, 4, ["no argument 'w_sd'", "w_std"]),
    ("linear(512", 10, 1, ["expected ')'"]),
    ("linear(3) relu", 10, 1, ["joined with '-'"]),
    ("linear(3)--relu", 10, 1, ["expected a layer name"]),
    ("linear(3)-relu-linear(-2)", 15, 10, ["positive int", "-2"]),
    ("conv2d(4)-relu", 0, 9, ["kernel_size"]),
    ("linear(3, 1.0, w_std=2, 0.5)", 24, 1, ["positional argument after a keyword"]),
    ("2*(linear(3)-relu", 17, 1, ["')'"]),
], ids=["unknown_layer", "unknown_keyword", "unclosed", "missing_dash", "double_dash",
        "bad_width", "missing_argument", "positional_after_keyword", "unclosed_repeat"])
def test_parse_errors_point_at_the_problem(spec, position, length, words):
    """The message gives the 1-based character position and a caret under the token."""
    with pytest.raises(ValueError) as info:
        parse_architecture(spec)
    message = str(info.value)
    assert f"at character {position + 1}" in message, message
    assert caret_column(message) == (position, length), message
    assert f"  {spec}" in message
    for w in words:
        assert w in message, message


def test_empty_and_wrong_types():
    with pytest.raises(ValueError, match="empty"):
        parse_architecture("  ")
    with pytest.raises(TypeError, match="int"):
        parse_architecture(3)
    with pytest.raises(ValueError, match="one key, 'layers'"):
        parse_architecture({"layer": "relu"})


def test_self_attention_parses_and_round_trips():
    """``selfattention(...)`` builds the same kernel as the hand-built layer (witness: the
    layer itself), and to_spec writes it back; a positional-embedding decay function has
    no spec form and is refused by name."""
    import torch

    import ntkit as nk
    from ntkit.spec import parse_architecture, to_spec

    spec = ("conv1d(8,3,padding=same)-relu-selfattention(8,2,w_out_std=1.5,mechanism=identity,"
            "pos_emb=sum)-globalavgpool-linear(1)")
    hand = nk.Sequential(nk.Conv1d(8, 3, padding="same"), nk.ReLU(),
                         nk.SelfAttention(8, 2, mechanism="identity", pos_emb="sum",
                                          w_out_std=1.5),
                         nk.GlobalAvgPool(), nk.Linear(1))
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = hand.kernel(x).ntk
    assert torch.equal(parse_architecture(spec).kernel(x).ntk, want)
    assert to_spec(hand) == spec
    decayed = nk.Sequential(nk.SelfAttention(8, pos_emb="sum", pos_emb_decay=torch.exp))
    with pytest.raises(ValueError, match="pos_emb_decay is a Python function"):
        to_spec(decayed)
