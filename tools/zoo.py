"""A zoo of ONNX files lfpass did not make, built here from configs (nothing downloaded), and
the option sets of ``lfpass optimize`` to run on them: what ``tests/onnx/test_real_files.py``
and ``tools/real_files.py`` share.

- a converter-style CNN whose weights and BatchNorm statistics are ``Constant`` nodes named
  unlike their nodes (``conv2d_3.w_0``, nodes ``p2o.Conv.3``), with a depthwise conv;
- torchvision MobileNetV3 (dynamo, external data), ResNet-18 (legacy exporter, opset 17),
  EfficientNet-B0 (dynamo);
- transformers BERT (dynamo with external data, and legacy), GPT-2 (dynamo), ViT (dynamo,
  external data), small configs with random weights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPTIONS = {  # name: optimize's flags ({calib}: the calibration .npz)
    "plain": ["--ratio", "1.2"],
    "regmean": ["--ratio", "1.2", "--merge", "regmean", "--inputs", "{calib}"],
    "budget": ["--max-error", "0.05", "--inputs", "{calib}"],
    "align-weights": ["--ratio", "1.2", "--align", "weights"],
    "align-activations": ["--ratio", "1.2", "--align", "activations", "--inputs", "{calib}"],
    "residual": ["--ratio", "1.2", "--residual-rank", "4", "--inputs", "{calib}"],
    "everything": ["--max-error", "0.05", "--merge", "regmean", "--align", "activations", "--residual-rank", "4",
                   "--inputs", "{calib}"],
    "distill": ["--ratio", "1.2", "--distill", "{calib}", "--stages", "2", "--steps", "4", "--batch-size", "8"],
    "distill-budget": ["--max-error", "0.05", "--distill", "{calib}", "--steps", "4", "--batch-size", "8"],
}


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array, name))


def converter_cnn(path) -> None:
    """Conv / BN / depthwise conv / three alike 3x3 convs / Gemm, every tensor a Constant node
    (``conv2d_3.w_0``: a converter's names), node names ``p2o.Conv.N``."""
    rng = np.random.default_rng(0)
    nodes, k = [], 0

    def conv(x, cin, cout, kernel, group=1, bn=True):
        nonlocal k
        w, b = f"conv2d_{k}.w_0", f"conv2d_{k}.b_0"
        nodes.append(_constant(w, (rng.standard_normal((cout, cin // group, kernel, kernel)) / np.sqrt(cin * kernel))
                               .astype(np.float32)))
        nodes.append(_constant(b, (0.1 * rng.standard_normal(cout)).astype(np.float32)))
        y = f"conv{k}.tmp"
        nodes.append(helper.make_node("Conv", [x, w, b], [y], name=f"p2o.Conv.{k}", group=group,
                                      pads=[kernel // 2] * 4))
        if bn:
            names = [f"batch_norm_{k}.{s}" for s in ("w_0", "b_0", "w_1", "w_2")]
            for n, a in zip(names, (1 + 0.1 * rng.standard_normal(cout), 0.1 * rng.standard_normal(cout),
                                    0.1 * rng.standard_normal(cout), 1 + rng.random(cout))):
                nodes.append(_constant(n, a.astype(np.float32)))
            nodes.append(helper.make_node("BatchNormalization", [y] + names, [f"bn{k}.tmp"], name=f"p2o.BN.{k}"))
            y = f"bn{k}.tmp"
        nodes.append(helper.make_node("Relu", [y], [f"relu{k}.tmp"], name=f"p2o.Relu.{k}"))
        k += 1
        return f"relu{k - 1}.tmp"

    x = conv("image", 3, 16, 3)
    x = conv(x, 16, 16, 3, group=16)  # depthwise
    for _ in range(3):
        x = conv(x, 16, 16, 3)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="p2o.Pool.0"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="p2o.Flatten.0"))
    nodes.append(_constant("fc_0.w_0", (rng.standard_normal((16, 10)) / 4).astype(np.float32)))
    nodes.append(helper.make_node("MatMul", ["flat", "fc_0.w_0"], ["logits"], name="p2o.MatMul.0"))
    graph = helper.make_graph(nodes, "converted", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                  ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _export(model, args, path, names, dims, dynamo: bool, external: bool = False) -> None:
    """``model`` through one of torch's exporters: dynamo (optionally with external data) or the
    legacy TorchScript one (opset 17, inline)."""
    import torch
    with torch.no_grad():
        if dynamo:
            shapes = tuple({k: torch.export.Dim(v, max=64) if v == "seq" else torch.export.Dim(v)
                            for k, v in d.items()} for d in dims)
            torch.onnx.export(model.eval(), args, str(path), dynamo=True, external_data=external, input_names=names,
                              dynamic_shapes=shapes, verbose=False)
        else:
            torch.onnx.export(model.eval(), args, str(path), dynamo=False, opset_version=17, input_names=names,
                              dynamic_axes={n: dict(d) for n, d in zip(names, dims)})


def _vision(name: str):
    def build(path) -> None:
        import torch
        import torchvision
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10)
        dynamo = name != "resnet18"  # resnet through the legacy exporter, the others through dynamo
        _export(model, (torch.randn(2, 3, 32, 32),), path, ["image"], [{0: "batch"}], dynamo,
                external=name == "mobilenet_v3_small")
    return build


def _transformer(kind: str, dynamo: bool, external: bool):
    """A small transformers model from its config (BERT, GPT-2, ViT), one output."""
    def build(path) -> None:
        import torch
        import transformers as tf
        torch.manual_seed(0)
        if kind == "vit":
            inner = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, intermediate_size=128))
            names, dims, args = ["image"], [{0: "batch"}], (torch.randn(2, 3, 32, 32),)
            call, key = (lambda m, image: m(pixel_values=image)), "last_hidden_state"
        else:
            if kind == "bert":
                inner = tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3,
                                                   num_attention_heads=4, intermediate_size=128,
                                                   max_position_embeddings=64))
                key = "last_hidden_state"
            else:
                inner = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=3, n_head=4,
                                                         n_positions=64, use_cache=False, bos_token_id=99,
                                                         eos_token_id=99))
                key = "logits"
            names, dims = ["input_ids", "attention_mask"], [{0: "batch", 1: "seq"}] * 2
            args = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long))
            call = lambda m, input_ids, attention_mask: m(input_ids=input_ids, attention_mask=attention_mask)  # noqa: E731

        class Image(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = inner

            def forward(self, image):
                return getattr(call(self.model, image), key)

        class Tokens(Image):
            def forward(self, input_ids, attention_mask):  # named inputs: the exporters see two
                return getattr(call(self.model, input_ids, attention_mask), key)

        _export((Image if kind == "vit" else Tokens)(), args, path, names, dims, dynamo, external)
    return build


def _images(shape):
    return lambda rng: {"image": rng.standard_normal((24, *shape)).astype(np.float32)}


def _tokens(rng):
    return {"input_ids": rng.integers(0, 100, (24, 8)).astype(np.int64), "attention_mask": np.ones((24, 8), np.int64)}


RISKY = ("budget", "align-activations", "residual")  # the calibrated options, on the rest of the zoo
ZOO = {  # name: (build, calibration arrays, options run on it)
    "converter-cnn": (converter_cnn, _images((3, 16, 16)), tuple(OPTIONS)),
    "mobilenet-dynamo-external": (_vision("mobilenet_v3_small"), _images((3, 32, 32)), tuple(OPTIONS)),
    "resnet-legacy": (_vision("resnet18"), _images((3, 32, 32)), (*RISKY, "distill")),
    "efficientnet-dynamo": (_vision("efficientnet_b0"), _images((3, 32, 32)), (*RISKY, "distill")),
    "bert-dynamo-external": (_transformer("bert", True, True), _tokens, (*RISKY, "distill", "distill-budget")),
    "bert-legacy": (_transformer("bert", False, False), _tokens, (*RISKY, "distill", "distill-budget")),
    "gpt2-dynamo": (_transformer("gpt2", True, False), _tokens, (*RISKY, "distill", "distill-budget")),
    "vit-dynamo-external": (_transformer("vit", True, True), _images((3, 32, 32)), (*RISKY, "distill")),
}
CELLS = [(model, option) for model, (_, _, options) in ZOO.items() for option in options]
# cells over a minute on 2 cores (full-width ResNet-18 and EfficientNet-B0 with calibrated options, whose
# budget measures every pair under each merge and alignment): the tests mark them slow (`pytest -m slow`);
# tools/real_files.py runs them all
SLOW = {(model, option) for model in ("resnet-legacy", "efficientnet-dynamo")
        for option in ("regmean", "budget", "align-activations", "residual", "distill")}
