"""A model with external data is fused in the memory of one group, not of the model.

Reads map each tensor afresh and unmap it when the array is dropped
(``read_array``); each merged tensor goes into the staged output data file as
it is made (``DataFile``); the rest is copied file to file. The output is the
same, bit for bit, as the in-memory path writes, each tensor is stored once,
and a failure part-way leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass.core.errors import PlanError
from lfpass.onnx import optimize
from lfpass.onnx.load import load_model, read_array

ROLES = ("a", "b", "c", "d", "e", "f")


def _model(path: Path, width: int, layers: int) -> Path:
    """``layers`` blocks of one MatMul per role (random, near nothing alike), tensors in ``NAME.data``."""
    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        for role in ROLES:
            name = f"blocks.{i}.{role}.weight"
            inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.05, name))
            nodes.append(helper.make_node("MatMul", [h, name], [f"{i}.{role}"], name=f"/{i}.{role}/MatMul"))
            h = f"{i}.{role}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["n", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
              size_threshold=0, convert_attribute=False)
    return path


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = load_model(path)
    return {name: np.array(v.const_value.numpy()) for name, v in model.graph.initializers.items()}


def _readers(path: Path) -> list[str]:
    return [n.input[1] for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_read_array_maps_a_tensor_only_while_its_array_lives(tmp_path):
    path = _model(tmp_path / "m.onnx", 24, 2)  # 2304-byte tensors: most start inside a page
    model = load_model(path)
    assert any(v.const_value.offset % 4096 for v in model.graph.initializers.values())
    for value in model.graph.initializers.values():
        tensor = value.const_value
        assert isinstance(tensor, ir.ExternalTensor)
        array = read_array(tensor)
        assert tensor.raw is None  # onnx-ir's whole-file mapping was never made
        assert not array.flags.writeable
        np.testing.assert_array_equal(array, np.array(tensor.numpy()))  # numpy() maps and keeps it ...
        assert tensor.raw is not None
        assert read_array(tensor) is tensor.numpy()  # ... and once made, it is what is read


def test_streamed_output_equals_the_in_memory_one_and_stores_each_tensor_once(tmp_path):
    path = _model(tmp_path / "m.onnx", 64, 4)
    streamed = optimize(path, tmp_path / "s.onnx", {"target_ratio": 2.0}, check=False)
    inline = optimize(path, tmp_path / "i.onnx", {"target_ratio": 2.0}, check=False, external_data=False)
    assert streamed.written and inline.written and streamed.ratio == inline.ratio > 1.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.onnx", "m.onnx", "m.onnx.data", "s.onnx", "s.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "s.onnx"), full_check=True)
    assert _readers(tmp_path / "s.onnx") == _readers(tmp_path / "i.onnx")
    got, want = _initializers(tmp_path / "s.onnx"), _initializers(tmp_path / "i.onnx")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    proto = onnx.load(str(tmp_path / "s.onnx"), load_external_data=False)
    spans = sorted((int(e["offset"]), int(e["length"])) for e in
                   ({x.key: x.value for x in t.external_data} for t in proto.graph.initializer))
    assert len(spans) == len(proto.graph.initializer) == len(want)  # every tensor external, none twice
    assert all(a + la == b for (a, la), (b, _) in zip(spans, spans[1:]))  # back to back, no gap, no overlap
    assert spans[-1][0] + spans[-1][1] == (tmp_path / "s.onnx.data").stat().st_size == streamed.bytes_after - (
        tmp_path / "s.onnx").stat().st_size


def test_a_failure_while_merging_leaves_nothing_behind(tmp_path, monkeypatch):
    import lfpass.onnx.rewrite as rewrite

    path = _model(tmp_path / "m.onnx", 32, 4)
    real = rewrite.merged_slots

    def fails_after_one(*args, **kwargs):
        for i, slot in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise PlanError("stopped part-way")
            yield slot

    monkeypatch.setattr(rewrite, "merged_slots", fails_after_one)
    with pytest.raises(PlanError, match="part-way"):
        optimize(path, tmp_path / "out.onnx", {"target_ratio": 2.0}, check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


_PEAK = textwrap.dedent("""
    import json, sys
    from lfpass.onnx import optimize
    def status(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
    model, out = sys.argv[1:3]
    optimize(model, out + ".warm.onnx", {"target_ratio": 2.0}, check=False)  # imports, allocator pools
    open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
    start = status("VmRSS:")
    optimize(model, out, {"target_ratio": 2.0}, check=False)
    print(json.dumps({"start": start, "peak": status("VmHWM:")}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to reset the peak")
def test_peak_memory_is_a_class_of_tensors_not_the_model(tmp_path):
    path = _model(tmp_path / "m.onnx", 512, 6)  # 36 tensors of 1 MiB; one class (a role) is 6 MiB
    data = (tmp_path / "m.onnx.data").stat().st_size
    done = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    growth = got["peak"] - got["start"]
    # every tensor left mapped, or every merged tensor held until the write, would pass half the data
    assert growth < 0.4 * data, f"optimize grew by {growth / 2**20:.1f} MiB on {data / 2**20:.1f} MiB of weights"
