"""A character-level tokenizer built offline with the `tokenizers` library.

One id per character, so `decode(encode(s)) == s` for any printable-ASCII text with newlines
(the same idea as nanoGPT's character-level Shakespeare and nanochat's byte tokenizer for CPU
tests). Ids: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, the role tokens `<|system|>`=4,
`<|user|>`=5, `<|assistant|>`=6, then "\\n"=7 and the 95 printable ASCII characters 32..126
(" "=8 ... "~"=102). Encoding adds no BOS/EOS; callers add them where a format needs them.
Special-token strings that occur literally in the text are matched as one token, as in every
HF tokenizer.
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = ("\n",) + tuple(chr(code) for code in range(32, 127))

# `<|role|>content</s>` per message, as Zephyr's template writes turns: every turn ends with EOS, so
# a policy's turn ends where generation stops (multi-turn SFT trains it, multi-turn RL samples it);
# the generation prompt opens the assistant turn. Roles other than system/user/assistant (e.g.
# "tool") are written as characters.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return the char-level tokenizer (103 ids) with specials and a chat template set."""
    tokens = (PAD, BOS, EOS, UNK) + ROLE_TOKENS + CHARACTERS
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character, newline included, is its own "word"; Fuse joins them back with no spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,  # the default cleanup would turn " ." into "."
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
