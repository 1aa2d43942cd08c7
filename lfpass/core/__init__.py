"""The IR-neutral core: every stage of layer fusion, knowing no torch and no ONNX.

The pipeline, one module per stage:

    sites ─► metrics ─► planner ─► plan ─► align / merge / lowrank ─► (a frontend writes it)
                          ▲
    calibration ─► budget / quality (measured damage, the keep-function path: keep)

- ``sites``, ``units``, ``layers``: what a layer is (kind, role, signature, slots), the
  attention / MLP units over layers, a layer's ``[out, in]`` view;
- ``metrics``, ``planner``, ``plan``, ``config``: similarity, grouping, the plan as data,
  the options;
- ``rules``, ``dtypes``, ``merge``: the merge-rule registry, exact dtype arithmetic, the
  plan-driven merge;
- ``calibration``, ``align``, ``lowrank``: input statistics, function-preserving alignment,
  low-rank parts;
- ``budget``, ``quality``: planning by measured damage and the error metrics;
- ``frontend``: the contract an IR adapter implements (``lfpass.fx``, ``lfpass.onnx``);
- ``keep``: the one keep-function pipeline over that contract;
- ``errors``, ``fileio``: the project's exceptions and atomic file writes.

Where things go: a new merge rule is a class in ``rules``; a new plan action is one
module here plus what each adapter writes for it, named in ``frontend.Frontend``; a new
IR is one adapter package implementing ``frontend.Frontend``.
"""
