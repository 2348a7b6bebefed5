"""GGUF for llama.cpp and Ollama: llama.cpp's own converter on a merged model folder, then a check of the file.

    from medsft.gguf_export import find_converter, staged_gguf, write_checked_gguf
    converter = find_converter("")                 # llama.cpp's converter, fetched from PyPI once into a cache
    with staged_gguf("output/m-Q8_0.gguf") as temp:    # renamed into place only if the block ends without an error
        record = write_checked_gguf("output/m", temp, "q8_0", converter, examples, "cpu")

The converter is llama.cpp's `convert_hf_to_gguf.py` with its `conversion/` package and its bundled `gguf-py`,
taken from the llama-cpp-python source distribution on PyPI (its `vendor/llama.cpp`) and run as a subprocess of
this Python: it needs only torch, transformers, numpy and sentencepiece, which this project installs. llama.cpp's
own requirements.txt pins an older torch and transformers; it is never installed here.

The GGUF is then read back with gguf-py and must (1) embed the folder's chat template byte for byte, (2) hold the
tokenizer's token list and special-token ids, and (3) give the folder's logits on the merge check's examples: its
tensors are dequantized, loaded into the transformers model in float32 and run, within a tolerance relative to the
largest logit that depends on the format (GGUF_TOLERANCE).
"""
import contextlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from medsft.errors import UserError

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendor/llama.cpp holds the converter (commit 0c1e570)
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")  # all the converter needs

# --gguf value -> the name llama.cpp gives the type, used in the file name (qwen3-1.7b-medical-v3-Q8_0.gguf)
GGUF_TYPES = {"q8_0": "Q8_0", "bf16": "BF16", "f32": "F32"}

# Largest |logit difference| allowed between the GGUF (dequantized, run in transformers) and the merged folder,
# as a share of the largest logit. Through llama.cpp itself the tiny model's GGUF differed from transformers by
# 2.4e-4 (F32, about 0.02% of the largest logit), 0.19% (BF16) and 0.9% (Q8_0), top token always the same; those
# figures include llama.cpp's own arithmetic (Q8_0 matmuls also round the activations to 8 bits), which this
# check leaves out. F32 and BF16 hold the folder's bf16 weights exactly, so the check should see no difference:
# 0.1% is half the BF16 runtime figure and far below any wrong tensor. Q8_0 rounds each weight to one of 255
# levels of its block of 32: this check saw 0.88% on the demo adapter (1,024 tokens), so the weight rounding is
# nearly all of the 0.9% the whole llama.cpp path showed; 2% (the bf16 merge's own tolerance) leaves room for a
# deeper model, while a swapped, shifted or missing tensor moves the logits by tens of percent.
GGUF_TOLERANCE = {"f32": 0.001, "bf16": 0.001, "q8_0": 0.02}

MISSING_PACKAGES_HINT = 'pip install "gguf>=0.19,<1" "sentencepiece>=0.2,<1" (both in requirements.txt)'


# ---------------------------------------------------------------------------------------------------------
# settings and the converter


def gguf_problems(gguf_type: str, llama_cpp_dir: str, gguf_path, overwrite: bool) -> list[str]:
    """Why --gguf cannot run as asked (bad type, missing packages, no converter in --llama_cpp, file exists)."""
    if not gguf_type:
        return []
    if gguf_type not in GGUF_TYPES:
        return [f"gguf must be one of {', '.join(GGUF_TYPES)} or '' (none), not {gguf_type!r}"]
    problems = []
    missing = [name for name in ("gguf", "sentencepiece") if importlib.util.find_spec(name) is None]
    if missing:
        problems.append(f"--gguf needs the package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}: "
                        f"{MISSING_PACKAGES_HINT}")
    if llama_cpp_dir and not (Path(llama_cpp_dir) / "convert_hf_to_gguf.py").is_file():
        problems.append(f"llama_cpp {llama_cpp_dir} has no convert_hf_to_gguf.py; name a llama.cpp checkout, or "
                        "pass --llama_cpp= to use the converter fetched from PyPI")
    if Path(gguf_path).exists() and not overwrite:
        problems.append(f"{gguf_path} already exists; pass --overwrite=True to replace it, or another --output_dir")
    return problems


def gguf_path_for(output_dir, gguf_type: str) -> Path:
    """Where the GGUF goes: beside the merged folder, named after it and the type (output/m -> output/m-Q8_0.gguf)."""
    out = Path(output_dir)
    return out.parent / f"{out.name}-{GGUF_TYPES[gguf_type]}.gguf"


def converter_cache() -> Path:
    """The folder the fetched converter is kept in (under $XDG_CACHE_HOME, else ~/.cache)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "medsft" / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON}"


def find_converter(llama_cpp_dir: str = "") -> Path:
    """The llama.cpp folder whose convert_hf_to_gguf.py converts: `llama_cpp_dir`, else the cached copy, fetched
    from PyPI the first time."""
    if llama_cpp_dir:
        return Path(llama_cpp_dir)
    cached = converter_cache()
    if not (cached / "convert_hf_to_gguf.py").is_file():
        fetch_converter(cached)
    return cached


def converter_commit(converter: Path) -> str | None:
    """The llama.cpp commit of a converter folder: the fetched copy's COMMIT file, or a checkout's git HEAD."""
    with contextlib.suppress(OSError):
        return (converter / "COMMIT").read_text().strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(["git", "-C", str(converter), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30)
        if result.returncode == 0:
            return result.stdout.strip()
    return None


def fetch_converter(dest: Path) -> None:
    """pip download llama-cpp-python's sdist (about 77 MB) and keep only the converter from its vendor/llama.cpp."""
    print(f"fetching llama.cpp's converter: pip download llama-cpp-python=={LLAMA_CPP_PYTHON} (its source, about "
          f"77 MB) from PyPI, keeping convert_hf_to_gguf.py and gguf-py in {dest} (once; later runs use that copy)",
          flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as temp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", temp], capture_output=True, text=True)
        archives = list(Path(temp).glob("llama_cpp_python-*.tar.gz"))
        if result.returncode != 0 or not archives:
            said = _last_line(result.stderr) or _last_line(result.stdout)
            raise UserError(f"error: could not fetch llama.cpp's converter (pip download llama-cpp-python=="
                            f"{LLAMA_CPP_PYTHON}: {said}); pass --llama_cpp=DIR naming a llama.cpp checkout")
        unpacked = Path(temp) / "converter"
        _unpack_converter(archives[0], unpacked)
        with contextlib.suppress(OSError):  # another run may have fetched it meanwhile: keep that one
            os.rename(unpacked, dest)
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"error: the llama-cpp-python {LLAMA_CPP_PYTHON} sdist has no vendor/llama.cpp/"
                        f"convert_hf_to_gguf.py; pass --llama_cpp=DIR naming a llama.cpp checkout")


def _unpack_converter(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        vendor = f"{top}/vendor/llama.cpp/"
        members = []
        for member in tar.getmembers():
            name = member.name[len(vendor):] if member.name.startswith(vendor) else ""
            if (member.isfile() or member.isdir()) and name and any(
                    name == f or (f.endswith("/") and name.startswith(f)) for f in CONVERTER_FILES):
                member.name = name
                members.append(member)
        tar.extractall(out, members=members, filter="data")
        with contextlib.suppress(KeyError, AttributeError):  # the submodule's commit, kept in the sdist's .git
            head = tar.extractfile(f"{top}/.git/modules/vendor/llama.cpp/HEAD").read().decode().strip()
            (out / "COMMIT").write_text(head + "\n")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------------------
# converting, checking, and keeping the file only if the check passed


@contextlib.contextmanager
def staged_gguf(gguf_path):
    """A hidden temporary name beside `gguf_path` (None when `gguf_path` is None), renamed to it when the block
    ends without an error and deleted otherwise: a failed conversion or check leaves no finished-looking GGUF."""
    if gguf_path is None:
        yield None
        return
    final = Path(gguf_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    try:
        yield temp
        os.replace(temp, final)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def convert(folder, outfile, gguf_type: str, converter: Path, model_name: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py on `folder`, in a subprocess of this Python, with its bundled gguf-py."""
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder), "--outtype", gguf_type,
               "--outfile", str(outfile), "--model-name", model_name]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not Path(outfile).is_file():
        said = _last_line(result.stderr) or _last_line(result.stdout)
        hint = f" ({MISSING_PACKAGES_HINT})" if "No module named" in said else ""
        raise UserError(f"error: llama.cpp's convert_hf_to_gguf.py failed on the merged model: {said}{hint}; "
                        "nothing was written")


def write_checked_gguf(folder, outfile, final_path, gguf_type: str, converter: Path, examples, device: str) -> dict:
    """Convert `folder` to `outfile` (the staged name of `final_path`), check it, and return merge.json's "gguf"
    record; raises on a failed check."""
    import time

    start = time.perf_counter()
    commit = converter_commit(converter)
    print(f"converting to GGUF {GGUF_TYPES[gguf_type]} with llama.cpp's convert_hf_to_gguf.py "
          f"({converter}, commit {commit[:7] if commit else 'unknown'})", flush=True)
    model_name = Path(final_path).name.removesuffix(f"-{GGUF_TYPES[gguf_type]}.gguf")
    convert(folder, outfile, gguf_type, converter, model_name)
    checks = check_gguf(outfile, folder, gguf_type, examples, device)
    logits = checks["logits"]
    figures = (f"largest difference from the merged folder {logits['max_abs_logit_difference']:.4g} "
               f"({100 * logits['relative_difference']:.3f}% of the largest logit; tolerance "
               f"{100 * logits['tolerance']:g}%), top token the same at {logits['top_token_agreement']}"
               if "max_abs_logit_difference" in logits else logits["problem"])
    print(f"GGUF check: chat template {_verdict(checks['chat_template'])}, tokens and special ids "
          f"{_verdict(checks['tokens'])}; logits on {logits['examples']} examples: {figures}", flush=True)
    failed = [name for name, check in checks.items() if not check["passed"]]
    if failed:
        name = failed[0]
        raise UserError(f"error: the GGUF failed its {name.replace('_', ' ')} check: {checks[name]['problem']}; "
                        "no GGUF and no merged folder were written")
    return {"file": str(final_path), "type": GGUF_TYPES[gguf_type],
            "bytes": Path(outfile).stat().st_size, "converter": "llama.cpp convert_hf_to_gguf.py",
            "llama_cpp_commit": commit, "converter_source": str(converter), "checks": checks,
            "seconds": round(time.perf_counter() - start, 1)}


def _verdict(check: dict) -> str:
    return "equal" if check["passed"] else "DIFFERENT"


def check_gguf(path, folder, gguf_type: str, examples, device: str) -> dict:
    """{check name: {"passed": bool, figures..., "problem": why it failed}} for the chat template, the tokens and
    special ids, and the logits."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    reader = GGUFReader(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return {"chat_template": _template_check(reader, tokenizer), "tokens": _token_check(reader, tokenizer),
            "logits": _logit_check(reader, folder, gguf_type, examples, device)}


def _field(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _template_check(reader, tokenizer) -> dict:
    embedded, expected = _field(reader, "tokenizer.chat_template"), tokenizer.chat_template
    passed = embedded == expected and bool(expected)
    found = "none is embedded" if embedded is None else f"{len(embedded)} characters against {len(expected or '')}"
    return {"passed": passed, "characters": len(embedded or ""),
            "problem": None if passed else f"the embedded chat template is not the folder's ({found})"}


def _token_check(reader, tokenizer) -> dict:
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    expected = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    first_different = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
    ids = {"eos": tokenizer.eos_token_id, "padding": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        ids["bos"] = tokenizer.bos_token_id
    embedded = {name: _field(reader, f"tokenizer.ggml.{name}_token_id") for name in ids}
    problems = []
    if len(tokens) < len(expected) or first_different is not None:
        where = first_different if first_different is not None else len(tokens)
        problems.append(f"token {where} is {tokens[where] if where < len(tokens) else 'missing'!r}, the tokenizer's "
                        f"is {expected[where]!r}")
    problems += [f"{name} token id {embedded[name]}, the tokenizer's is {ids[name]}" for name in ids
                 if embedded[name] != ids[name]]
    return {"passed": not problems, "tokens": len(tokens), "tokenizer_tokens": len(expected),
            "special_token_ids": embedded, "problem": "; ".join(problems) or None}


def _logit_check(reader, folder, gguf_type: str, examples, device: str) -> dict:
    """The folder's model in float32, run on `examples`; then the GGUF's dequantized tensors loaded into the same
    model (one tensor at a time, no second copy) and run again."""
    import torch
    from transformers import AutoModelForCausalLM

    from medsft.model_export import iter_logits, logits_of

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    model.to(device=device, dtype=torch.float32).eval()
    reference = logits_of(model, examples)
    problem = load_gguf_tensors(reader, model)
    tolerance = GGUF_TOLERANCE[gguf_type]
    scale = max(r.abs().max().item() for r in reference)
    types = [t.tensor_type.name for t in reader.tensors]
    result = {"passed": False, "tolerance": tolerance, "max_abs_logit": scale, "examples": len(examples),
              "tokens_compared": sum(len(ids) for ids in examples),
              "tensor_types": {name: types.count(name) for name in sorted(set(types))},
              "embedding_type": next((t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"),
                                     None), "has_output_tensor": any(t.name == "output.weight" for t in reader.tensors)}
    if problem:
        return result | {"problem": problem}
    difference, same_top, positions = 0.0, 0, 0
    for logits, ref in zip(iter_logits(model, examples), reference):
        difference = max(difference, (logits - ref).abs().max().item())
        same_top += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
        positions += len(ref)
    del model
    passed = difference <= tolerance * scale
    return result | {
        "passed": passed, "max_abs_logit_difference": difference, "relative_difference": difference / scale,
        "top_token_agreement": f"{same_top}/{positions}",
        "problem": None if passed else f"its logits differ from the merged folder's by {difference:.4g} "
        f"({100 * difference / scale:.2f}% of the largest logit, tolerance {100 * tolerance:g}% for {gguf_type})"}


def load_gguf_tensors(reader, model) -> str | None:
    """Copy every tensor of the GGUF, dequantized with gguf-py, into the transformers model's parameter of the same
    role (gguf-py's own name map); the problem as one sentence when the two do not correspond, else None."""
    import gguf
    import numpy as np
    import torch

    architecture = _field(reader, "general.architecture")
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(architecture)
    if arch is None:
        return f"its architecture {architecture!r} is unknown to gguf-py"
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head is the embedding's parameter: listed once
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            tensor = tensors.get(gguf_name)
            if tensor is None:
                return f"it has no tensor for {name} ({gguf_name})"
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            if values.size != param.numel():
                return f"its {gguf_name} holds {values.size} values, the model's {name} {param.numel()}"
            param.copy_(torch.from_numpy(np.array(values, dtype=np.float32).reshape(param.shape)))
            used.add(gguf_name)
    extra = sorted(set(tensors) - used)
    return f"it holds tensors the model does not have: {', '.join(extra[:3])}" if extra else None
