"""GPT-2 tokenizer ids, and that loading it needs no network."""
import hashlib
import os
import socket
import subprocess
import sys

from conftest import PROJECT
from speedrun.tokenizer import EOT_ID, encode_document, get_encoding

VOCAB_BPE_KEY = hashlib.sha1(
    b"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe").hexdigest()


def test_known_ids():
    enc = get_encoding()
    assert enc.name == "gpt2" and enc.n_vocab == 50257 and EOT_ID == enc.eot_token == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("The quick brown fox jumps over the lazy dog.") == [
        464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]


def test_encode_document_puts_eot_first():
    assert encode_document("Hello world") == [50256, 15496, 995]
    assert encode_document("") == [50256]
    # special-token text inside a document is plain text, not a document boundary
    assert EOT_ID not in encode_document("a <|endoftext|> b")[1:]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(cache_dir) -> dict:
    """A fresh, empty cache and every proxy pointing at a closed port: any download would fail."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(TIKTOKEN_CACHE_DIR=str(cache_dir), PYTHONPATH=str(PROJECT), HTTPS_PROXY=proxy,
               HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy)
    return env


def _encode_in_fresh_process(env) -> str:
    code = ("from speedrun.tokenizer import get_encoding\n"
            "print(get_encoding().encode_ordinary('Hello world'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_works_offline_from_an_empty_cache(tmp_path):
    cache = tmp_path / "fresh-cache"
    assert _encode_in_fresh_process(_offline_env(cache)) == "[15496, 995]"
    assert sorted(p.name for p in cache.iterdir()) == sorted([
        VOCAB_BPE_KEY, hashlib.sha1(
            b"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json").hexdigest()])


def test_damaged_cache_file_is_replaced(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / VOCAB_BPE_KEY).write_text("not the GPT-2 merges")
    assert _encode_in_fresh_process(_offline_env(cache)) == "[15496, 995]"
    assert hashlib.sha256((cache / VOCAB_BPE_KEY).read_bytes()).hexdigest().startswith("1ce16647")
