"""Datasets in their published schemas load with the default keys: every type TRL documents (standard
and conversational), Anthropic HH-RLHF transcripts, UltraFeedback binarized (with scores), no_robots
and GSM8K. The report names the detected type; HH transcripts become chat messages; multi-turn SFT
trains every assistant turn, checked token by token; pair scores reach the reward model's margin and
ranked losses. Toy char tokenizer (one id per character, `<|role|>content</s>` chat template)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rlhf_ray.algorithms.losses import LossScale
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data import (
    DataError, Keys, PreferenceExample, load_kto, load_preferences, load_prompts, load_ranked, load_sft,
    transcript_messages)
from rlhf_ray.toy import build_char_tokenizer, save_toy_models
from rlhf_ray.trainers import dpo, rm, sft
from rlhf_ray.workers import _plain_forward, sequence_logprobs
from tests.unit.chat_rows import assistant, system, text, user, write

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EOS = "</s>"
LIMITS = {"max_prompt_len": 200, "max_response_len": 64}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def fields(tok, example):
    """An example decoded back to text, field by field."""
    out = {"prompt": text(tok, example.prompt_ids)}
    for name in ("response_ids", "chosen_ids", "rejected_ids"):
        if hasattr(example, name):
            out[name.removesuffix("_ids")] = text(tok, getattr(example, name))
    if hasattr(example, "responses_ids"):
        out["responses"] = [text(tok, ids) for ids in example.responses_ids]
    return out


# ---- TRL's documented types, standard and conversational (https://huggingface.co/docs/trl/dataset_formats) ----

Q = [user("What color is the sky?")]
Q_TEXT = "<|user|>What color is the sky?</s><|assistant|>"
TRL_EXAMPLES = {
    "language-modeling": (load_sft, {"text": "The sky is blue."},
                          "language modeling (standard)", {"prompt": "T", "response": "he sky is blue." + EOS}),
    "language-modeling-chat": (load_sft, {"messages": Q + [assistant("It is blue.")]},
                               "language modeling (conversational)", {"prompt": Q_TEXT, "response": "It is blue." + EOS}),
    "prompt-only": (load_prompts, {"prompt": "The sky is"}, "prompt-only (standard)", {"prompt": "The sky is"}),
    "prompt-only-chat": (load_prompts, {"prompt": Q}, "prompt-only (conversational)", {"prompt": Q_TEXT}),
    "prompt-completion": (load_sft, {"prompt": "The sky is", "completion": " blue."},
                          "prompt-completion (standard), response column 'completion'",
                          {"prompt": "The sky is", "response": " blue." + EOS}),
    "prompt-completion-chat": (load_sft, {"prompt": Q, "completion": [assistant("It is blue.")]},
                               "prompt-completion (conversational), response column 'completion'",
                               {"prompt": Q_TEXT, "response": "It is blue." + EOS}),
    "preference": (load_preferences, {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                   "preference (standard)", {"prompt": "The sky is", "chosen": " blue." + EOS, "rejected": " green." + EOS}),
    "preference-chat": (load_preferences, {"prompt": Q, "chosen": [assistant("It is blue.")],
                                           "rejected": [assistant("It is green.")]},
                        "preference (conversational)",
                        {"prompt": Q_TEXT, "chosen": "It is blue." + EOS, "rejected": "It is green." + EOS}),
    "implicit-prompt": (load_preferences, {"chosen": "The sky is blue.", "rejected": "The sky is green."},
                        "preference, implicit prompt (standard)",
                        {"prompt": "The sky is", "chosen": " blue." + EOS, "rejected": " green." + EOS}),
    "implicit-prompt-chat": (load_preferences, {"chosen": Q + [assistant("It is blue.")],
                                                "rejected": Q + [assistant("It is green.")]},
                             "preference, implicit prompt (conversational)",
                             {"prompt": Q_TEXT, "chosen": "It is blue." + EOS, "rejected": "It is green." + EOS}),
    "unpaired": (load_kto, {"prompt": "The sky is", "completion": " blue.", "label": True},
                 "unpaired preference (standard), response column 'completion'",
                 {"prompt": "The sky is", "response": " blue." + EOS}),
    "unpaired-chat": (load_kto, {"prompt": Q, "completion": [assistant("It is green.")], "label": False},
                      "unpaired preference (conversational), response column 'completion'",
                      {"prompt": Q_TEXT, "response": "It is green." + EOS}),
    "ranked": (load_ranked, {"prompt": "The sky is", "responses": [" blue.", " grey.", " green."], "scores": [2, 1, 0]},
               "ranked (standard)", {"prompt": "The sky is", "responses": [" blue." + EOS, " grey." + EOS, " green." + EOS]}),
    "ranked-from-implicit-pairs": (load_ranked, {"chosen": "The sky is blue.", "rejected": "The sky is green."},
                                   "preference, implicit prompt (standard)",
                                   {"prompt": "The sky is", "responses": [" blue." + EOS, " green." + EOS]}),
}


@pytest.mark.parametrize("name", list(TRL_EXAMPLES))
def test_each_documented_type_loads_with_default_keys_and_is_reported(tmp_path, tok, name):
    loader, row, detected, expected = TRL_EXAMPLES[name]
    source = write(tmp_path / name, [row])
    limits = LIMITS if loader is not load_prompts else {"max_prompt_len": 200}
    [example], report = loader(source, tok, **limits)
    assert report.format == detected
    assert f"{source} [{detected}]: kept 1/1 rows" == str(report)
    assert fields(tok, example) == expected


def test_a_key_set_explicitly_wins_and_is_never_aliased(tmp_path, tok):
    both = write(tmp_path / "both", [{"prompt": "p", "response": "from response", "completion": "from completion"}])
    [default], _ = load_sft(both, tok, **LIMITS)
    [explicit], _ = load_sft(both, tok, keys=Keys(response="completion"), **LIMITS)
    assert text(tok, default.response_ids) == "from response" + EOS
    assert text(tok, explicit.response_ids) == "from completion" + EOS
    only_completion = write(tmp_path / "completion", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"needs columns \['prompt', 'answer'\] or \['messages'\] or \['text'\]"):
        load_sft(only_completion, tok, keys=Keys(response="answer"), **LIMITS)


def test_missing_columns_name_every_accepted_type(tmp_path, tok):
    source = write(tmp_path / "odd", [{"question": "q", "good": "g"}])
    with pytest.raises(DataError, match=r"needs columns \['prompt', 'chosen', 'rejected'\] or \['chosen', 'rejected'\], "
                                        r"has \['good', 'question'\]; set data.<name>_key"):
        load_preferences(source, tok, **LIMITS)


# ---- Anthropic HH-RLHF: whole transcripts, no prompt column ----------------------------------------------------

HH_ROWS = [  # the published schema: {"chosen": str, "rejected": str}, each a transcript starting "\n\nHuman:"
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."},
    {"chosen": "\n\nHuman: Hi!\n\nAssistant: Hello. How can I help?\n\nHuman: Name a colour.\nOne word."
               "\n\nAssistant: Blue.",
     "rejected": "\n\nHuman: Hi!\n\nAssistant: Hello. How can I help?\n\nHuman: Name a colour.\nOne word."
                 "\n\nAssistant: I will not."},
]
HH_PROMPTS = [[user("What is 2+2?")],
              [user("Hi!"), assistant("Hello. How can I help?"), user("Name a colour.\nOne word.")]]


def test_transcripts_parse_into_messages():
    assert transcript_messages(HH_ROWS[1]["chosen"]) == HH_PROMPTS[1] + [assistant("Blue.")]
    # A prompt transcript ends with the open assistant turn.
    assert transcript_messages("\n\nHuman: hi\n\nAssistant:") == [user("hi"), assistant("")]
    assert transcript_messages("Human: hi\n\nAssistant: yo") == [user("hi"), assistant("yo")]
    for plain in ("The sky is blue.", "Human: no assistant turn", "Say \n\nHuman: x\n\nAssistant: y", ""):
        assert transcript_messages(plain) is None


def test_hh_pairs_render_every_earlier_turn_with_the_chat_template(tmp_path, tok):
    source = write(tmp_path / "hh", HH_ROWS)
    pairs, report = load_preferences(source, tok, **LIMITS)
    assert report.format == "preference, implicit prompt (HH-RLHF transcripts)"
    for pair, messages in zip(pairs, HH_PROMPTS):
        assert text(tok, pair.prompt_ids) == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text(tok, pairs[1].prompt_ids) == ("<|user|>Hi!</s><|assistant|>Hello. How can I help?</s>"
                                              "<|user|>Name a colour.\nOne word.</s><|assistant|>")
    assert [text(tok, p.chosen_ids) for p in pairs] == ["4." + EOS, "Blue." + EOS]
    assert [text(tok, p.rejected_ids) for p in pairs] == ["5." + EOS, "I will not." + EOS]
    # Without a chat template the messages become role lines.
    plain = build_char_tokenizer()
    plain.chat_template = None
    [first, _], _ = load_preferences(source, plain, **LIMITS)
    assert text(plain, first.prompt_ids) == "user: What is 2+2?\nassistant: "


def test_hh_prompts_for_rl_and_hh_prompt_columns(tmp_path, tok):
    [single, multi], report = load_prompts(write(tmp_path / "hh", HH_ROWS), tok, max_prompt_len=200)
    assert report.format == "preference, implicit prompt (HH-RLHF transcripts)"
    assert (single.prompt, multi.prompt) == tuple(HH_PROMPTS)  # what rows written from these prompts carry
    # Derived sets that split HH into prompt / chosen / rejected keep the transcript in the prompt.
    row = {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "chosen": " 4.", "rejected": " 5."}
    [pair], _ = load_preferences(write(tmp_path / "split", [row]), tok, **LIMITS)
    assert text(tok, pair.prompt_ids) == "<|user|>What is 2+2?</s><|assistant|>"


def test_pairs_without_a_shared_prompt_are_bad_rows_named_by_row(tmp_path, tok):
    rows = [HH_ROWS[0],
            {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Hey\n\nAssistant: b"},  # differ early
            {"chosen": "Yes.", "rejected": "No."}]  # no shared words
    source = write(tmp_path / "bad", rows)
    with pytest.raises(DataError) as caught:
        load_preferences(source, tok, **LIMITS)
    assert (caught.value.row, caught.value.key, caught.value.reason) == (2, "rejected", "bad_value")
    assert "differ before their last message" in str(caught.value)
    kept, report = load_preferences(source, tok, on_bad_row="skip", **LIMITS)
    assert len(kept) == 1 and report.dropped == {"bad_value": 2}
    mixed = write(tmp_path / "mixed", [{"chosen": Q + [assistant("blue")], "rejected": "The sky is green."}])
    with pytest.raises(DataError, match=r"row 1, key 'rejected': 'chosen' and 'rejected' must both be strings"):
        load_preferences(mixed, tok, **LIMITS)


# ---- UltraFeedback binarized, no_robots, GSM8K ------------------------------------------------------------------

def ultrafeedback(prompt, good, bad, score_chosen, score_rejected):
    """HuggingFaceH4/ultrafeedback_binarized: chosen / rejected repeat the user turn."""
    return {"prompt": prompt, "prompt_id": "0" * 64, "chosen": [user(prompt), assistant(good)],
            "rejected": [user(prompt), assistant(bad)], "messages": [user(prompt), assistant(good)],
            "score_chosen": score_chosen, "score_rejected": score_rejected}


UF_ROWS = [ultrafeedback("What is 2+2?", "4", "5", 8.0, 5.5), ultrafeedback("Name a colour.", "Blue", "Table", 9, 2)]


def test_ultrafeedback_pairs_keep_their_scores_and_their_conversation(tmp_path, tok):
    source = write(tmp_path / "uf", UF_ROWS)
    pairs, report = load_preferences(source, tok, **LIMITS)
    assert report.format == "preference (conversational)"
    assert text(tok, pairs[0].prompt_ids) == "<|user|>What is 2+2?</s><|assistant|>"
    assert (text(tok, pairs[0].chosen_ids), text(tok, pairs[0].rejected_ids)) == ("4" + EOS, "5" + EOS)
    assert [p.scores for p in pairs] == [[8.0, 5.5], [9.0, 2.0]]
    # The same file as ranked lists of 2 (RRHF, listwise RM), and its `messages` for SFT.
    lists, _ = load_ranked(source, tok, **LIMITS)
    assert [(len(e.responses_ids), e.scores) for e in lists] == [(2, [8.0, 5.5]), (2, [9.0, 2.0])]
    assert lists[1].responses_ids == [pairs[1].chosen_ids, pairs[1].rejected_ids]
    sft_examples, report = load_sft(source, tok, **LIMITS)
    assert report.format == "language modeling (conversational)"
    assert text(tok, sft_examples[1].response_ids) == "Blue" + EOS


@pytest.mark.parametrize("scores, reason", [((3.0, 7.0), "bad_value"), (("high", 1.0), "wrong_type"),
                                            ((None, 1.0), "missing_key")])
def test_bad_pair_scores_are_named(tmp_path, tok, scores, reason):
    source = write(tmp_path / "uf", [UF_ROWS[0], ultrafeedback("Hi", "Hello", "Go", *scores)])
    with pytest.raises(DataError) as caught:
        load_preferences(source, tok, **LIMITS)
    assert (caught.value.row, caught.value.key, caught.value.reason) == (2, "score_chosen", reason)


def test_no_robots_rows_train_on_their_messages(tmp_path, tok):
    row = {"prompt": "Write a haiku.", "prompt_id": "1" * 64, "category": "Generation",
           "messages": [system("You are a poet."), user("Write a haiku."), assistant("Old pond, a frog jumps")]}
    [example], report = load_sft(write(tmp_path / "no_robots", [row]), tok, **LIMITS)
    assert report.format == "language modeling (conversational)"
    assert text(tok, example.prompt_ids) == "<|system|>You are a poet.</s><|user|>Write a haiku.</s><|assistant|>"
    assert text(tok, example.response_ids) == "Old pond, a frog jumps" + EOS
    assert example.assistant_mask is None  # one assistant turn: nothing to train inside the prompt


def test_gsm8k_questions_are_rl_prompts_with_their_answer_as_metadata(tmp_path, tok):
    row = {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    source = write(tmp_path / "gsm8k", [row])
    [detected], report = load_prompts(source, tok, max_prompt_len=200)
    [explicit], _ = load_prompts(source, tok, keys=Keys(prompt="question"), max_prompt_len=200)
    assert report.format == "prompt-only (standard), prompt column 'question'"
    assert detected == explicit
    assert detected.prompt_text == row["question"] and detected.metadata == {"answer": row["answer"]}


# ---- multi-turn SFT: every assistant turn trained, token by token -------------------------------------------------

CONVERSATION = [system("be brief"), user("hi"), assistant("yo"), user("and?"), assistant("ok!"), user("bye"),
                assistant("ciao")]
# The prompt of the last turn in pieces: (text, trained). Only the earlier assistant contents and the </s> closing
# them are trained; the </s> closing a system or user turn is context.
PIECES = [("<|system|>be brief</s><|user|>hi</s><|assistant|>", 0), ("yo</s>", 1), ("<|user|>and?</s><|assistant|>", 0),
          ("ok!</s>", 1), ("<|user|>bye</s><|assistant|>", 0)]


def expand(tok, pieces):
    ids, mask = [], []
    for piece, trained in pieces:
        piece_ids = tok.encode(piece, add_special_tokens=False)
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    return ids, mask


def test_every_assistant_turn_is_masked_token_by_token(tmp_path, tok):
    source = write(tmp_path / "chat", [{"messages": CONVERSATION}])
    [example], _ = load_sft(source, tok, **LIMITS)  # sft_turns="all" is the default
    ids, mask = expand(tok, PIECES)
    assert example.prompt_ids == ids and example.assistant_mask == mask
    assert [t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m] == ["y", "o", EOS, "o", "k", "!", EOS]
    assert text(tok, example.response_ids) == "ciao" + EOS
    # The batch's response_mask: 1 on "yo</s>", "ok!</s>" and "ciao</s>", 0 on every other token.
    batch = sft.collate(tok.pad_token_id, [example])
    assert batch.response_mask[0, 0].tolist() == mask + [1] * 5
    assert batch.response_lengths.tolist() == [[12.0]]
    # sft_turns="last": the same tokens, only the last turn trained.
    [last], _ = load_sft(source, tok, sft_turns="last", **LIMITS)
    assert last.prompt_ids == ids and last.assistant_mask is None
    assert sft.collate(tok.pad_token_id, [last]).response_mask[0, 0].tolist() == [0] * len(ids) + [1] * 5


def test_the_sft_loss_sums_exactly_the_assistant_tokens(tmp_path, tok):
    """The ranks' ℓ(y) on a multi-turn batch = Σ log π over the assistant tokens, by hand on the toy policy."""
    model = AutoModelForCausalLM.from_pretrained(save_toy_models(tmp_path / "toy", seed=1).policy).eval()
    [example], _ = load_sft(write(tmp_path / "chat", [{"messages": CONVERSATION}]), tok, **LIMITS)
    sequence = example.prompt_ids + example.response_ids
    trained = example.assistant_mask + [1] * len(example.response_ids)
    with torch.no_grad():
        ours = sequence_logprobs(_plain_forward(model), sft.collate(tok.pad_token_id, [example]))[0, 0]
        logprobs = F.log_softmax(model(torch.tensor([sequence])).logits[0, :-1], -1)  # position t-1 predicts t
        by_hand = sum(logprobs[t - 1, sequence[t]] for t in range(1, len(sequence)) if trained[t])
    assert ours.item() == pytest.approx(by_hand.item(), abs=1e-4)


def test_a_template_that_closes_turns_with_eos_trains_the_eos(tmp_path):
    """Zephyr-style turns `<|role|>content</s>\\n`: the EOS ending an assistant turn is trained, the newline is not."""
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    rows = [{"messages": [user("hi"), assistant("yo"), user("ok"), assistant("bye")]}]
    [example], _ = load_sft(write(tmp_path / "chat", rows), tok, **LIMITS)
    expected = expand(tok, [("<|user|>hi</s>\n<|assistant|>", 0), ("yo</s>", 1), ("\n<|user|>ok</s>\n<|assistant|>", 0)])
    assert (example.prompt_ids, example.assistant_mask) == expected


def test_without_a_chat_template_role_lines_are_masked(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = None
    [example], _ = load_sft(write(tmp_path / "chat", [{"messages": CONVERSATION[1:5]}]), tok, **LIMITS)
    expected = expand(tok, [("user: hi\nassistant: ", 0), ("yo\n", 1), ("user: and?\nassistant: ", 0)])
    assert (example.prompt_ids, example.assistant_mask) == expected


def test_masks_follow_a_left_cut_and_a_first_assistant_message_is_context(tmp_path, tok):
    source = write(tmp_path / "chat", [{"messages": CONVERSATION}])
    [cut], report = load_sft(source, tok, max_prompt_len=20, max_response_len=64, overlength="truncate_left")
    ids, mask = expand(tok, PIECES)
    assert (cut.prompt_ids, cut.assistant_mask) == (ids[-20:], mask[-20:]) and report.truncated == {"prompt": 1}
    greeting = write(tmp_path / "greeting", [{"messages": [assistant("welcome"), user("hi"), assistant("yo")]}])
    [example], _ = load_sft(greeting, tok, **LIMITS)
    assert example.assistant_mask is None
    assert text(tok, example.prompt_ids) == "<|assistant|>welcome</s><|user|>hi</s><|assistant|>"


def test_a_template_that_rewrites_history_cannot_be_masked(tmp_path):
    """E.g. reasoning templates drop earlier assistant content: the row is named, sft_turns=last is the fix."""
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|assistant|>' }}"
                         "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    source = write(tmp_path / "chat", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"row 1, key 'messages': .*set data.sft_turns=last") as caught:
        load_sft(source, tok, **LIMITS)
    assert caught.value.reason == "bad_value"
    [example], _ = load_sft(source, tok, sft_turns="last", **LIMITS)
    assert text(tok, example.response_ids) == "ciao" + EOS


# ---- scores into training: the reward model's margin, RRHF ---------------------------------------------------------

def rm_config(*overrides):
    return load_config(CONFIGS / "toy_rm.yaml", list(overrides))


def test_score_margin_objective_by_hand(tok):
    pairs = [PreferenceExample([5], [10, 2], [11, 2], [8.0, 5.5]), PreferenceExample([5], [12, 2], [13, 2], [3.0, 3.0])]
    batch = rm.collate(tok, pairs)
    assert batch.scores.tolist() == [[8.0, 5.5], [3.0, 3.0]]
    outputs = torch.tensor([[2.0, 1.0], [0.5, 0.0]])  # the model's scores r_chosen, r_rejected
    loss, shares, _ = rm.score_margin_objective(outputs, batch, LossScale(num_tokens=8.0, num_seqs=2.0, max_len=4))
    expected = (-math.log(1 / (1 + math.exp(-(1.0 - 2.5)))) - math.log(1 / (1 + math.exp(-0.5)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert shares["accuracy"].item() == 1.0
    unscored = rm.collate(tok, [PreferenceExample([5], [10, 2], [11, 2])])
    assert unscored.scores is None


def test_margin_from_scores_is_picked_once_and_checked(tmp_path, tok):
    assert rm.objective(rm_config("data.margin_from_scores=true")) is rm.score_margin_objective
    for overrides in (("rm.loss=ranked_pairs",), ("rm.margin=1.0",)):
        with pytest.raises(ConfigError, match="data.margin_from_scores=true .* needs rm.loss=pairwise and rm.margin=0"):
            rm.objective(rm_config("data.margin_from_scores=true", *overrides))
    cfg = rm_config("data.margin_from_scores=true", "data.max_prompt_len=200")
    pairs = rm.load_examples(cfg, tok, write(tmp_path / "uf", UF_ROWS), "train")
    assert [p.scores for p in pairs] == [[8.0, 5.5], [9.0, 2.0]]
    unscored = write(tmp_path / "hh", HH_ROWS)
    with pytest.raises(DataError, match="needs the columns 'score_chosen' and 'score_rejected'"):
        rm.load_examples(cfg, tok, unscored, "train")


def test_rrhf_and_listwise_take_scored_pairs(tmp_path, tok):
    cfg = load_config(CONFIGS / "toy_rrhf.yaml", ["data.max_prompt_len=200"])
    lists = dpo.load_examples(cfg, tok, write(tmp_path / "uf", UF_ROWS), "train")
    assert [e.scores for e in lists] == [[8.0, 5.5], [9.0, 2.0]]
    batch = dpo.collate(tok.pad_token_id, lists)
    assert batch.scores.tolist() == [[8.0, 5.5], [9.0, 2.0]] and batch.input_ids.shape[:2] == (2, 2)
    hh = dpo.load_examples(cfg, tok, write(tmp_path / "hh", HH_ROWS), "train")  # no scores: chosen ranks first
    assert [e.scores for e in hh] == [[1.0, 0.0], [1.0, 0.0]]
    listwise = rm.load_examples(rm_config("rm.loss=listwise", "data.max_prompt_len=200"), tok,
                                write(tmp_path / "uf2", UF_ROWS), "train")
    assert [len(e.responses_ids) for e in listwise] == [2, 2]
