"""A fused PyTorch model saved and loaded back with its ties: safetensors, each shared tensor once.

A fused model shares one ``nn.Parameter`` among several layers. ``safetensors``
refuses tensors that share memory (and ``torch.save`` of a state dict, or Hugging
Face's ``save_pretrained``, would store or load each name on its own), so saving
the usual way either fails or loses the sharing. :func:`save_pretrained` writes
every distinct tensor once under its first name, and the tie map (every other
name -> the name stored) in the file's metadata (``lfpass.ties``); beside it
the model's Hugging Face ``config.json`` when it has one, and the plan
(``lfpass_plan.json``) when given. :func:`load_pretrained` builds the model
(from ``config.json`` with ``transformers`` when no model is given), points each
tied name at its stored tensor's ``nn.Parameter`` and loads the tensors: the
ties are back, the values bit for bit, the unique-parameter count the fused
one's.

What is restored is the tie structure of the model given (or built from the
config): a plan that rewrote modules (low rank, shared bases, residuals) needs
that rewritten model passed in, since its modules are not in the config.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from lfpass.core.errors import InputError, first_line
from lfpass.core.plan import FusionPlan

WEIGHTS = "model.safetensors"
PLAN = "lfpass_plan.json"
TIES = "lfpass.ties"


def save_pretrained(model: nn.Module, directory: str | Path, plan: FusionPlan | None = None) -> Path:
    """Write ``model``'s parameters and buffers to ``directory/model.safetensors``, each shared
    tensor once, with the tie map; ``config.json`` (a Hugging Face model's) and the plan beside.
    Files are written atomically. Returns the weights file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored, ties = _distinct(model)
    _atomic(directory / WEIGHTS, lambda tmp: save_file(stored, str(tmp), metadata={"format": "pt",
                                                                                     TIES: json.dumps(ties)}))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        config = copy.deepcopy(config)
        if type(model).__module__.startswith("transformers."):
            config.architectures = [type(model).__name__]  # what load_pretrained builds
        _atomic(directory / "config.json", lambda tmp: tmp.write_text(config.to_json_string()))
    if plan is not None:
        _atomic(directory / PLAN, lambda tmp: tmp.write_text(plan.to_json()))
    return directory / WEIGHTS


def load_pretrained(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The model saved in ``directory`` with its ties: loaded into ``model`` (built from
    ``config.json`` by ``transformers`` when None), each tied name sharing its stored tensor's
    parameter. One :class:`InputError` line for a folder that is not such a save or a model
    whose names do not match it."""
    from safetensors import safe_open

    directory = Path(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        raise InputError(f"{directory}: no {WEIGHTS} (written by lfpass.save_pretrained)")
    try:
        with safe_open(str(path), framework="pt") as f:
            ties = json.loads((f.metadata() or {}).get(TIES, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    model = _built(directory) if model is None else model
    state = model.state_dict(keep_vars=True)
    names = set(tensors) | set(ties)
    missing, unexpected = sorted(set(state) - names), sorted(names - set(state))
    if missing or unexpected:
        raise InputError(f"{directory}: the model does not match the save (missing: {missing[:3] or 'none'}, "
                         f"unknown: {unexpected[:3] or 'none'})")
    for alias, stored in ties.items():
        _point(model, alias, state[stored])
    with torch.no_grad():
        model.load_state_dict({**tensors, **{a: tensors[s] for a, s in ties.items()}}, strict=True)
    return model


def _distinct(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct tensor of ``model`` under its first name, and every other name -> that name."""
    stored: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
            stored[name] = tensor.detach().cpu().contiguous()
    return stored, ties


def _point(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make ``model``'s ``name`` hold ``tensor`` itself (a parameter or a buffer)."""
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if isinstance(tensor, nn.Parameter):
        setattr(owner, attr, tensor)
    else:
        owner.register_buffer(attr, tensor, persistent=True)


def _built(directory: Path) -> nn.Module:
    """The Hugging Face model ``directory/config.json`` describes, freshly initialised."""
    if not (directory / "config.json").is_file():
        raise InputError(f"{directory}: no config.json to build the model from; pass the model to load into")
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        raise InputError("building a saved model from config.json needs transformers; pass the model instead") from None
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None:
        from transformers import AutoModel

        return AutoModel.from_config(config).eval()
    return cls(config).eval()


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
