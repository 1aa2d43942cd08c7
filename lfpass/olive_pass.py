"""lfpass as an Olive pass (``pip install lfpass[olive]``): budgeted fusion inside Olive workflows.

Olive (microsoft/Olive) chains passes (conversion, quantization, pruning) and
evaluates each candidate with its own metrics (accuracy, latency, size on disk).
:class:`LfpassFusion` is an ONNX -> ONNX pass: it takes the calibration data
Olive's ``data_config`` provides, runs ``lfpass optimize`` under its budget
(:func:`lfpass.onnx.optimize.optimize`: the plan menu, the error verified on
samples the planner never saw, optional quantization), and returns the written
model, the report beside it (``lfpass_report.json``).

Olive finds a pass ``type`` only through its package config's ``passes`` table
(no entry points; a dotted path does not load), and ``--package-config``
replaces the default table. :func:`package_config` writes Olive's own table
with this pass added; :func:`run` runs a workflow with it (telemetry off unless
the caller set ``OLIVE_DISABLE_TELEMETRY`` otherwise):

    python -m lfpass.olive_pass examples/olive/cnn.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Union

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")

from olive.common.config_utils import validate_config  # noqa: E402
from olive.data.config import DataConfig  # noqa: E402
from olive.hardware.accelerator import AcceleratorSpec  # noqa: E402
from olive.model import ONNXModelHandler  # noqa: E402
from olive.model.utils import resolve_onnx_path  # noqa: E402
from olive.passes import Pass  # noqa: E402
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model  # noqa: E402
from olive.passes.pass_config import BasePassConfig, PassConfigParam  # noqa: E402

PASS = "LfpassFusion"
REPORT = "lfpass_report.json"


class LfpassFusion(Pass):
    """Fuse similar layers (ties, shared bases, low rank: lfpass's plan menu) within an output-error
    budget measured on the calibration data, then optionally quantize; ONNX in, ONNX out."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        config = {
            "data_config": PassConfigParam(type_=Union[DataConfig, dict], required=True,
                                           description="calibration data (its inputs; labels are not needed)"),
            "max_error": PassConfigParam(type_=float, default_value=0.02,
                                         description="output error budget (1 - mean cosine by default), verified "
                                                     "on calibration samples the planner never saw"),
            "target_ratio": PassConfigParam(type_=float, default_value=None,
                                            description="a compression target instead of (or under) the budget"),
            "actions": PassConfigParam(type_=str, default_value="auto",
                                       description="plan menu actions: auto, or a comma list of tie, residual, "
                                                   "basis, lowrank, collapse"),
            "quantize": PassConfigParam(type_=str, default_value="none",
                                        description="none, int8, int8-weights or int4, within the same budget"),
            "pooling": PassConfigParam(type_=str, default_value="none",
                                       description="what the error is read on: none, mean (over attention_mask), "
                                                   "cls"),
            "hold_shared_once": PassConfigParam(type_=bool, default_value=False,
                                                description="declare shared tensors overridable so onnxruntime "
                                                            "holds each once, unpacked (less memory, slower)"),
            "calibration_batches": PassConfigParam(type_=int, default_value=0,
                                                   description="batches taken from the data config (0: all)"),
        }
        config.update(get_external_data_config())
        return config

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        import onnx

        from lfpass.core.config import FusionConfig
        from lfpass.onnx.optimize import optimize

        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        batches = calibration(config, model)
        fusion = FusionConfig(target_ratio=config.target_ratio, max_error=config.max_error, actions=config.actions,
                              quantize=config.quantize, pooling=config.pooling)
        with tempfile.TemporaryDirectory(prefix="lfpass-olive-") as tmp:
            written = Path(tmp) / "fused.onnx"
            result = optimize(model.model_path, written, fusion, inputs=batches, check=False,
                              hold_shared_once=config.hold_shared_once)
            report = Path(output_model_path).parent / REPORT
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result.to_dict(), indent=2, default=str))
            source = written if written.exists() else Path(model.model_path)  # nothing fusable: the input as it was
            proto = onnx.load(str(source))
            return model_proto_to_olive_model(proto, output_model_path, config)


def calibration(config: Any, model: ONNXModelHandler) -> list[dict[str, Any]]:
    """The input batches of ``config.data_config`` (numpy, by input name), as Olive's quantization
    passes read them."""
    data_config = validate_config(config.data_config, DataConfig)
    reader = data_config.to_data_container().create_calibration_dataloader(model_path=model.model_path,
                                                                          io_config=model.io_config)
    batches = []
    while (batch := reader.get_next()) is not None:
        batches.append(batch)
        if config.calibration_batches and len(batches) >= config.calibration_batches:
            break
    return batches


def package_config(path: str | Path) -> Path:
    """Olive's own package config with :class:`LfpassFusion` added, written to ``path``."""
    import olive

    table = json.loads((Path(olive.__file__).parent / "olive_config.json").read_text())
    table["passes"][PASS] = {"module_path": f"{__name__}.{LfpassFusion.__name__}", "supported_providers": ["*"],
                             "supported_accelerators": ["*"], "supported_precisions": ["*"],
                             "supported_algorithms": [], "supported_quantization_encodings": [],
                             "dataset": "dataset_required"}
    path = Path(path)
    path.write_text(json.dumps(table, indent=2))
    return path


def run(workflow: str | Path | dict[str, Any]) -> Any:
    """Run an Olive workflow (a JSON path or dict) whose passes may use ``"type": "LfpassFusion"``."""
    from olive.workflows import run as olive_run

    with tempfile.TemporaryDirectory(prefix="lfpass-olive-") as tmp:
        table = package_config(Path(tmp) / "olive_config.json")
        config = json.loads(Path(workflow).read_text()) if not isinstance(workflow, dict) else workflow
        return olive_run(config, package_config=str(table))


if __name__ == "__main__":
    run(sys.argv[1])
