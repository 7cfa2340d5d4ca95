"""Token ids of the Python `tokenizers` package (and, when installed,
`transformers`' AutoTokenizer and apply_chat_template) for the cases that
tests/tokenizer_reference.rs wrote, compared with the project's ids.

Usage: check_tokenizers.py CASES.json. Each case: {"dir", "texts",
"with_special", "without_special", "chats": [{"messages", "ids"}]}.
Prints one line per comparison and exits non-zero on any difference.
"""
import json
import sys

from tokenizers import Tokenizer

try:
    from transformers import AutoTokenizer  # noqa: F401
    import transformers

    HAVE_TRANSFORMERS = True
except Exception:  # transformers missing or broken: tokenizers only
    HAVE_TRANSFORMERS = False

cases = json.load(open(sys.argv[1]))
failures = 0


def check(what, want, got):
    global failures
    ok = want == got
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + ("" if ok else f": reference {want}, project {got}"))


for case in cases:
    name = case["name"]
    tok = Tokenizer.from_file(case["dir"] + "/tokenizer.json")
    # As transformers loads it: saved padding and truncation off.
    tok.no_padding()
    tok.no_truncation()
    for text, with_special, without in zip(case["texts"], case["with_special"], case["without_special"]):
        check(f"{name} tokenizers add_special_tokens=True {text!r}", tok.encode(text, add_special_tokens=True).ids, with_special)
        check(f"{name} tokenizers add_special_tokens=False {text!r}", tok.encode(text, add_special_tokens=False).ids, without)
    if HAVE_TRANSFORMERS:
        hf = AutoTokenizer.from_pretrained(case["dir"])
        for text, with_special in zip(case["texts"], case["with_special"]):
            check(f"{name} transformers {transformers.__version__} tokenizer(text) {text!r}", hf(text)["input_ids"], with_special)
        for chat in case["chats"]:
            ids = hf.apply_chat_template(chat["messages"], tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            check(f"{name} transformers apply_chat_template {chat['messages']!r}", list(ids), chat["ids"])
    else:
        print(f"note: transformers is not installed: {name} checked against tokenizers only")

print(f"{failures} failures")
sys.exit(1 if failures else 0)
