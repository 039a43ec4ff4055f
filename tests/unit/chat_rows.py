"""Helpers shared by the data-format tests: JSONL files written in a test, chat messages, decoded ids."""

import json


def write(path, rows):
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}
