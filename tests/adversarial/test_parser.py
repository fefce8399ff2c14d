"""Hostile specs and model files: the parser and `ntkit.sklearn.load` refuse them at once
with a typed error that says what is wrong (issue 14, "parser and model files").

Each case here failed before: a RecursionError, a hang, a BadZipFile / KeyError /
JSONDecodeError / unexpected-keyword TypeError, or a model that loaded and predicted NaN.
Timing guards use generous bounds (1 s) for work that takes milliseconds when refused
early and minutes (or forever) when not.
"""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest
import torch

import ntkit as nk
from ntkit.errors import ModelFileError, SpecError
from ntkit.sklearn import NNGPRegressor, NTKClassifier, NTKRegressor, load, save
from ntkit.spec import SpecLimits, parse_architecture

X = np.random.default_rng(0).normal(size=(12, 3))
Y = np.sin(X).sum(1)
X_TEST = np.random.default_rng(1).normal(size=(5, 3))


def refused_quickly(call, error=SpecError, match: str | None = None, seconds: float = 1.0):
    """``call()`` raises ``error`` (matching ``match``) within ``seconds``; the error."""
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        call()
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"refused after {elapsed:.2f} s"
    return info.value


def caret_column(message: str) -> tuple[int, int]:
    """(reported 1-based character, caret's 1-based column in the quoted text) of a
    parse error: the caret must sit under the character the message names."""
    position = int(re.search(r"at character (\d+)", message).group(1))
    lines = message.split("\n")
    quoted, carets = lines[1], lines[2]
    shift = 3 if quoted.startswith("  ...") else 0   # a window into a long spec
    return position, carets.index("^") - 2 - shift + 1


# ------------------------------------------------------------------ truncated input
@pytest.mark.parametrize("spec, where", [
    ("linear(", 8), ("linear((", 9), ("linear(2", 9), ("linear(2,", 10), ("3*(relu", 8),
    ("relu-", 6), ("3*", 3), ("linear(2, w_std=", 17), ("conv2d(4, (3,", 14),
    ("linear('a", 8),
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_truncated_spec_is_a_spec_error_with_position_and_caret(spec, where):
    """A truncated spec is a SpecError (a ValueError) naming the character where it
    stops, with the caret under it (``"linear("`` was a RecursionError)."""
    e = refused_quickly(lambda: parse_architecture(spec))
    assert isinstance(e, ValueError)
    position, column = caret_column(str(e))
    assert position == where and column == where, str(e)


def test_caret_window_in_a_long_spec_points_at_the_error():
    """In a 45,000-character spec the message shows a window around the error (not
    the whole text) and its caret still sits under the bad character."""
    spec = "-".join(["relu"] * 9_000) + "-nosuchlayer-relu"
    e = refused_quickly(lambda: parse_architecture(spec), match="unknown layer 'nosuchlayer'")
    lines = str(e).split("\n")
    position = int(re.search(r"at character (\d+)", lines[0]).group(1))
    assert position == spec.index("nosuchlayer") + 1
    window = lines[1][5:]                       # after "  ..."
    column = lines[2].index("^") - 5
    assert window[column:column + len("nosuchlayer")] == "nosuchlayer"
    assert len(str(e)) < 2_000


# ------------------------------------------------------------------ nesting, repeats, layers
@pytest.mark.parametrize("spec", [
    "1*(" * 5000 + "relu" + ")" * 5000,
    "linear(" + "(" * 5000 + "1" + ")" * 5000 + ")",
    "linear(" + "(" * 5000,
], ids=["repeat-groups", "tuple-args", "unclosed-tuples"])
def test_5000_nested_parentheses_are_refused_not_recursion(spec):
    refused_quickly(lambda: parse_architecture(spec), match="max_depth=32")


def test_depth_limit_is_exact_and_overridable():
    """32 nested groups parse (and have the kernel of the layer inside: a Repeat of one
    is the layer itself); 33 are refused; a larger max_depth accepts 33."""
    def nested(d):
        return "1*(" * d + "relu" + ")" * d
    x = torch.randn(4, 3, dtype=torch.float64)
    net = parse_architecture("linear(5)-" + nested(32))
    want = nk.Sequential(nk.Linear(5), nk.ReLU()).kernel(x)
    torch.testing.assert_close(net.kernel(x).nngp, want.nngp, rtol=1e-12, atol=1e-12)
    refused_quickly(lambda: parse_architecture(nested(33)), match="max_depth")
    parse_architecture(nested(33), limits=SpecLimits(max_depth=40))


def test_repeat_bomb_is_refused_before_expansion():
    """``1000000*(1000000*(...))`` parsed and then never finished; now the count is
    refused at once, and so is an expansion beyond max_layers made of small counts."""
    refused_quickly(lambda: parse_architecture("1000000*(1000000*(linear(2)-relu))"),
                    match="repeat count is 1000000.*max_repeat=1000")
    refused_quickly(lambda: parse_architecture("1000*(1000*(1000*(1000*(linear(2)-relu))))"),
                    match=r"layers after expanding repeats is 2000000\b.*max_layers=10000")
    refused_quickly(lambda: parse_architecture("9" * 100 + "*relu"), match="100-digit")


def test_layer_count_limit_is_exact_and_overridable():
    """10,000 layers after expansion parse (and expand to exactly that many); 10,001 are
    refused, as a product of repeats or as a plain chain; limits raise the bounds."""
    net = parse_architecture("100*(50*(relu-relu))")
    assert len(net.layers) == 100 and len(net.layers[0].layers) == 50
    refused_quickly(lambda: parse_architecture("100*(50*(relu-relu))-relu"),
                    match="is 10001, above the limit max_layers")
    refused_quickly(lambda: parse_architecture("-".join(["relu"] * 10_001)),
                    match="is 10001, above the limit max_layers")
    assert parse_architecture("200*(200*(relu))", limits=SpecLimits(max_layers=40_000)).n == 200
    refused_quickly(lambda: parse_architecture("3*relu", limits=SpecLimits(max_repeat=2)),
                    match="repeat count is 3, above the limit max_repeat=2")


def test_too_long_spec_and_number_are_spec_errors():
    refused_quickly(lambda: parse_architecture("relu", limits=SpecLimits(max_chars=3)),
                    match="its length is 4, above the limit max_chars=3")
    refused_quickly(lambda: parse_architecture("linear(" + "9" * 5000 + ")"),
                    match="5000 digits is too long")


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_depth must be a positive int"):
        SpecLimits(max_depth=0)
    with pytest.raises(TypeError, match="SpecLimits"):
        parse_architecture("relu", limits={"max_depth": 3})


# ------------------------------------------------------------------ layer lists, JSON, YAML
def test_deep_json_and_python_lists_are_refused_not_recursion(tmp_path):
    """100,000-deep JSON (a RecursionError inside json.loads) and deep Python lists."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    refused_quickly(lambda: parse_architecture(deep), match="bracket depth is 100000")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"layers": [{"layer": "linear", "args": [' + "[" * 100_000 + "1"
                       + "]" * 100_000 + "]}]}")
    refused_quickly(lambda: parse_architecture(wrapped), match="max_depth")
    nested: list = ["relu"]
    for _ in range(100_000):
        nested = [{"repeat": 1, "layers": nested}]
    refused_quickly(lambda: parse_architecture(nested), match="nesting depth")
    args: list = [1]
    for _ in range(100_000):
        args = [args]
    refused_quickly(lambda: parse_architecture([{"layer": "linear", "args": args}]),
                    match="nesting depth")


def test_json_repeat_bomb_and_truncated_json(tmp_path):
    bomb = {"layers": [{"repeat": 1000, "layers": [{"repeat": 1000, "layers": ["relu"]}]}]}
    refused_quickly(lambda: parse_architecture(bomb), match="is 1000000, above.*max_layers")
    refused_quickly(lambda: parse_architecture([{"repeat": 10**12, "layers": ["relu"]}]),
                    match="max_repeat")
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": ["linear(2)", ')
    refused_quickly(lambda: parse_architecture(bad), match="not valid JSON")


def test_yaml_alias_bomb_and_deep_yaml_are_refused(tmp_path):
    """An alias bomb (nine levels of nine aliases each: 9**9 layers once expanded) is
    refused from its first anchor; deep YAML is refused before it is built."""
    pytest.importorskip("yaml")
    lines = ["a: &a [relu, relu, relu, relu, relu, relu, relu, relu, relu]"]
    for i in range(8):
        prev, name = chr(97 + i), chr(98 + i)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    lines.append("layers: *i")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    refused_quickly(lambda: parse_architecture(bomb), match="anchors and aliases")
    deep = tmp_path / "deep.yml"
    deep.write_text("[" * 20_000 + "]" * 20_000)
    refused_quickly(lambda: parse_architecture(deep), match="nesting depth", seconds=3.0)
    good = tmp_path / "good.yaml"
    good.write_text("layers:\n  - {repeat: 2, layers: [linear(8), relu]}\n  - linear(1)\n")
    x = torch.randn(4, 3, dtype=torch.float64)
    want = parse_architecture("2*(linear(8)-relu)-linear(1)").kernel(x).ntk
    torch.testing.assert_close(parse_architecture(good).kernel(x).ntk, want)


def test_spec_file_over_the_size_limit(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"layers": ["relu"] * 100}))
    refused_quickly(lambda: parse_architecture(path, limits=SpecLimits(max_chars=50)),
                    match="file size in bytes")


# ------------------------------------------------------------------ model files
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A saved NTKRegressor, its predictions, and its entries (meta parsed)."""
    path = tmp_path_factory.mktemp("model") / "model.npz"
    est = NTKRegressor("linear(8)-relu-linear(1)").fit(X, Y)
    save(est, path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    return path, est.predict(X_TEST), meta, arrays


def write(path, meta, arrays, raw_meta=None):
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)) if raw_meta is None else raw_meta,
                 **arrays)
    return path


def test_model_file_round_trip_is_unchanged(model_file, tmp_path):
    """The witness that the checks refuse only bad files: a rewritten copy of a good
    file loads and predicts bit for bit."""
    _, want, meta, arrays = model_file
    copy = write(tmp_path / "copy.npz", meta, arrays)
    np.testing.assert_array_equal(load(copy).predict(X_TEST), want)


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.9, 0.999])
def test_truncated_model_file_is_a_model_file_error(model_file, tmp_path, fraction):
    path, *_ = model_file
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[:int(len(data) * fraction)])
    e = refused_quickly(lambda: load(cut), error=ModelFileError, match="truncated|readable")
    assert isinstance(e, ValueError)


def test_non_npz_files_are_model_file_errors(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00garbage" * 100)
    refused_quickly(lambda: load(junk), error=ModelFileError, match="readable .npz")
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    refused_quickly(lambda: load(single), error=ModelFileError, match="one .npy array")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.npz")


def _set(d, key, value):
    d = json.loads(json.dumps(d))
    d[key] = value
    return d


CRAFTED_META = {
    "unknown-parameter": (lambda m: _set(m, "params", _set(m["params"], "evil", 1)),
                          r"parameters \['evil'\] that NTKRegressor does not take"),
    "parameter-a-mapping": (lambda m: _set(m, "params", _set(m["params"], "depth", {"a": 1})),
                            r"depth=\{'a': 1\} is not a number"),
    "parameter-wrong-value": (lambda m: _set(m, "params", _set(m["params"], "dtype", "int8")),
                              "refused by NTKRegressor: dtype must be"),
    "unknown-meta-key": (lambda m: _set(m, "extra", 1), r"unknown keys \['extra'\]"),
    "missing-meta-key": (lambda m: {k: v for k, v in m.items() if k != "n_features_in"},
                         r"lacks \['n_features_in'\]"),
    "meta-a-list": (lambda m: [1, 2], "not a mapping"),
    "wrong-class": (lambda m: _set(m, "class", "os.system"), "class 'os.system'"),
    "bad-n-features": (lambda m: _set(m, "n_features_in", -3), "'n_features_in' is -3"),
    "bad-solver": (lambda m: _set(m, "solver_", "pickle"), "'solver_' is 'pickle'"),
    "repeat-bomb": (lambda m: _set(m, "params", _set(
        m["params"], "architecture", "1000000*(1000000*(linear(2)-relu))")), "max_repeat"),
    "deep-spec": (lambda m: _set(m, "params", _set(
        m["params"], "architecture", "1*(" * 5000 + "relu" + ")" * 5000)), "max_depth"),
    "truncated-spec": (lambda m: _set(m, "params", _set(
        m["params"], "architecture", "linear(")), "does not parse.*character 8"),
    "spec-names-a-file": (lambda m: _set(m, "params", _set(
        m["params"], "architecture", "/etc/passwd.json")), "names a file"),
    "huge-depth": (lambda m: _set(m, "params", _set(_set(m["params"], "architecture", None),
                                                    "depth", 10**9)), "max_layers"),
}


@pytest.mark.parametrize("case", list(CRAFTED_META), ids=list(CRAFTED_META))
def test_crafted_meta_is_refused_by_name(model_file, tmp_path, case):
    _, _, meta, arrays = model_file
    change, match = CRAFTED_META[case]
    crafted = write(tmp_path / "crafted.npz", change(meta), arrays)
    refused_quickly(lambda: load(crafted), error=ModelFileError, match=match)


def test_meta_that_is_not_json(model_file, tmp_path):
    _, _, meta, arrays = model_file
    for raw, match in [(np.array('{"format": "ntkit.sklearn.v1", '), "not valid JSON"),
                       (np.array(3.0), "not one JSON string"),
                       (np.array("[" * 100_000 + "]" * 100_000), "bracket depth")]:
        crafted = write(tmp_path / "m.npz", meta, arrays, raw_meta=raw)
        refused_quickly(lambda: load(crafted), error=ModelFileError, match=match)  # noqa: B023


def _with(arrays, name, value):
    out = dict(arrays)
    if value is None:
        out.pop(name)
    else:
        out[name] = value
    return out


@pytest.mark.parametrize("name, change, match", [
    ("dual_coef_", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a),
     "dual_coef_ holds 1 NaN or inf"),
    ("X_fit_", lambda a: a * np.inf, "X_fit_ holds 36 NaN or inf"),
    ("X_fit_", lambda a: a[:, :2], r"X_fit_ has shape \(12, 2\).*imply \(12, 3\)"),
    ("dual_coef_", lambda a: a[:-1], r"dual_coef_ has shape \(11, 1\)"),
    ("dual_coef_", lambda a: a.astype(str), "not a 2-D array of numbers"),
    ("dual_coef_", lambda a: None, r"lacks the fitted arrays \['dual_coef_'\]"),
], ids=["nan-coefficient", "inf-training-data", "feature-count", "row-count", "string-dtype",
        "missing"])
def test_crafted_arrays_are_refused(model_file, tmp_path, name, change, match):
    """NaN/inf coefficients or training data (which loaded and predicted NaN), and
    arrays whose shapes disagree, are refused at load, naming the array."""
    _, _, meta, arrays = model_file
    crafted = write(tmp_path / "a.npz", meta, _with(arrays, name, change(arrays[name])))
    refused_quickly(lambda: load(crafted), error=ModelFileError, match=match)


def test_unknown_array_entry_is_refused(model_file, tmp_path):
    _, _, meta, arrays = model_file
    crafted = write(tmp_path / "u.npz", meta, {**arrays, "__code__": np.zeros(1)})
    refused_quickly(lambda: load(crafted), error=ModelFileError,
                    match=r"unknown entries \['__code__'\]")


def test_classifier_and_nngp_shapes_are_checked(tmp_path):
    """The classifier's classes_ must match its coefficient columns; the NNGP
    regressor's covariance operator must be n x n and finite."""
    labels = np.array(["a", "b", "c"])[np.arange(12) % 3]
    for est, name, change, match in [
            (NTKClassifier(depth=1), "classes_", lambda a: a[:2], r"classes_ has shape \(2,\)"),
            (NNGPRegressor(depth=1), "cov_coef_", lambda a: a[:, :5], r"cov_coef_ has shape"),
            (NNGPRegressor(depth=1), "cov_coef_", lambda a: a * math.nan, "cov_coef_ holds")]:
        target = labels if isinstance(est, NTKClassifier) else Y
        path = tmp_path / "e.npz"
        save(est.fit(X, target), path)
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("meta")))
        assert type(load(path)) is type(est)          # the good file loads
        crafted = write(tmp_path / "c.npz", meta, _with(arrays, name, change(arrays[name])))
        refused_quickly(lambda: load(crafted), error=ModelFileError, match=match)  # noqa: B023


def test_save_refuses_nan_and_keeps_the_previous_file(model_file, tmp_path):
    """Saving an estimator with NaN coefficients is refused before anything is written,
    so the file already at the path stays whole and loadable."""
    path, want, *_ = model_file
    target = tmp_path / "kept.npz"
    target.write_bytes(path.read_bytes())
    est = NTKRegressor("linear(8)-relu-linear(1)").fit(X, Y)
    est.dual_coef_ = est.dual_coef_ * np.nan
    with pytest.raises(ModelFileError, match="dual_coef_ holds NaN"):
        save(est, target)
    np.testing.assert_array_equal(load(target).predict(X_TEST), want)
    assert [p.name for p in tmp_path.iterdir()] == ["kept.npz"]    # no partial file left


def test_load_limits_apply_to_the_stored_spec(model_file):
    path, want, *_ = model_file
    refused_quickly(lambda: load(path, limits=SpecLimits(max_layers=2)),
                    error=ModelFileError, match="max_layers=2")
    np.testing.assert_array_equal(load(path, limits=SpecLimits(max_layers=3)).predict(X_TEST),
                                  want)


@pytest.mark.parametrize("spec", ["erf(a=nan)", "erf(1.5, nan)",
                                  [{"layer": "erf", "kwargs": {"a": float("nan")}}]],
                         ids=["keyword", "positional", "json"])
def test_nan_arguments_are_refused(spec):
    """``erf(a=nan)`` built a layer whose kernels are all NaN; finite and infinite
    values are left to each layer's own checks (``erf(a=1.5)`` parses)."""
    refused_quickly(lambda: parse_architecture(spec), match="is NaN, which no layer can use")
    assert parse_architecture("erf(a=1.5)").a == 1.5
