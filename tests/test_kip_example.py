"""The KIP example (examples/kip.py) keeps working: a few Adam steps on the support
images lower the KIP loss on the whole training set, and the script runs end to end
(table, figure)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "kip.py"


@pytest.fixture(scope="module")
def kip():
    spec = importlib.util.spec_from_file_location("kip_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_steps_lower_the_loss_on_the_training_set(kip):
    """The loss on all training images (not only the sampled target batches) drops
    after 8 steps, and the support images moved: the gradient in the inputs reaches
    them through the NTK."""
    split = kip.load_split("fc")
    net = kip.network("fc")
    gen = torch.Generator().manual_seed(0)
    x0, l0 = kip.random_support(split, 2, gen)
    y_train = kip.targets(split.labels_train)

    def full_loss(x_s, y_s):
        with torch.no_grad():
            return float(kip.kip_loss(net, x_s, y_s, split.x_train, y_train))

    before = full_loss(x0, kip.targets(l0))
    x_s, y_s, history = kip.kip(net, split, x0, l0, steps=8, batch=200, lr=0.02,
                                learn_labels=False, gen=gen)
    assert len(history) == 8 and all(torch.isfinite(torch.tensor(history)))
    assert float((x_s - x0).abs().max()) > 1e-3
    assert torch.equal(y_s, kip.targets(l0))  # labels fixed
    assert full_loss(x_s, y_s) < 0.98 * before


def test_script_runs_and_writes_table_and_figure(kip, tmp_path, capsys):
    out = kip.main(["--steps", "3", "--batch", "50", "--per-class", "1", "--draws", "1",
                    "--learn-labels", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "| KIP: 1 learned images per class |" in text
    assert "| 1 random real images per class |" in text
    assert (tmp_path / "kip_digits.png").stat().st_size > 1000
    assert all(0.0 <= a <= 1.0 for a in out["kip"] + out["random"] + [out["full"]])
    assert out["full"] > 0.9  # the whole training set: the kernel itself is sound
