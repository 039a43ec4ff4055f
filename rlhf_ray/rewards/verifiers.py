"""Verifiable (rule) rewards for RLVR, usable as `reward.sources[i].path: rlhf_ray.rewards.verifiers:<name>`.

Each takes (prompts, responses, metadata) and returns one float per sample. The reference is the row's
`answer` column, else its `solution` column (every column but the prompt reaches rewards as metadata),
read the way the common datasets write it, with no remapping:
- GSM8K (Cobbe et al. 2021, arXiv:2110.14168): a worked solution ending in `#### <number>`;
- MATH (Hendrycks et al. 2021, arXiv:2103.03874): a solution with the answer in `\\boxed{...}`
  (nested braces allowed); MATH-500 also has a plain `answer` column, which wins;
- a plain number or short string.
A reference none of these reads raises ValueError naming it, so the reward contract fails naming the
source and sample, or masks the sample with `reward.on_error=mask`; it is never scored 0.

The response's answer is its last complete `\\boxed{}`, else its last `#### x`, else what follows its last
"answer is", else its last number. Both answers are normalised after MATH's `is_equiv`/`strip_string`
(github.com/hendrycks/math): `$`, `\\text{}`, `\\left`/`\\right`, `\\dfrac`, degrees, `%`, a trailing `.`,
`x =`; numbers (`1,000`, `+2.0`, `3/4`, `\\frac{3}{4}`, `-0.75`, `72 apples`) compare as exact
rationals, anything else as text without whitespace and case.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

REFERENCE_KEYS = ("answer", "solution")  # metadata columns holding the reference, first non-null wins

_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"  # commas only as thousands separators
_SIGNED = re.compile(rf"[+-]?(?:{_DECIMAL})(?:[eE][+-]?\d{{1,3}})?")
_RATIO = re.compile(rf"([+-]?)({_DECIMAL})/({_DECIMAL})")
_LATEX_FRAC = re.compile(rf"([+-]?)\\frac\{{([+-]?(?:{_DECIMAL}))\}}\{{([+-]?(?:{_DECIMAL}))\}}")
_NUMBER_IN_TEXT = re.compile(  # a hyphen after a word or digit is a minus, not a sign
    rf"-?\\[dt]?frac(?:\{{[^{{}}]*\}}|\d){{2}}|(?<![\w.])[+-]?(?:{_DECIMAL})(?:/(?:{_DECIMAL}))?(?!\d)")
_LEADING_NUMBER = re.compile(rf"\$?\s*({_NUMBER_IN_TEXT.pattern})(?![\w/])")
_WITH_UNIT = re.compile(r"(\S+)\s+([A-Za-z]+(?:\s+[A-Za-z]+){0,2})(?:\s*\^\s*\d)?")  # "72 clips", "12 cm^2"
# a unit written onto the number ("12cm", "5kg"): only these, since "3x" or "2pi" is algebra, not 3 or 2
_ATTACHED_UNIT = re.compile(r"(.+?)(cm|mm|km|m|kg|mg|g|lbs?|oz|ft|yd|mi|ml|l|sec|s|min|hrs?|h|mph|kph)(?:\^\d)?",
                            re.IGNORECASE)
_NOT_UNITS = {"and", "or", "to", "plus", "minus", "times"}
_MAX_NUMBER_CHARS = 64  # longer digit strings compare as text (int() refuses over 4300 digits)

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_TOKEN = re.compile(r"[^\s${}]+")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_ANSWER_IS = re.compile(r"\banswer\s*(?:(?:is|was)\b|[:=])\s*:?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # a word that is not a LaTeX command

_DELIMITERS = re.compile(r"\\[()\[\]]|\\?\$")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_DIGIT_GROUP = re.compile(r"(?<=\d)(?:\\[,!]|\{,\})(?=\d{3}(?!\d))")  # 1\,000 and 1{,}000
_SPACING = re.compile(r"\\[,;:! ]|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_PERCENT = re.compile(r"\\?%")
_FRAC_SHORT = re.compile(r"\\frac\s*(\w|\{[^{}]*\})\s*(\w|\{[^{}]*\})")  # \frac12 → \frac{1}{2}
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\w)")  # \sqrt3 → \sqrt{3}
_ASSIGNMENT = re.compile(r"[A-Za-z]\s*=\s*(.+)")  # "x = 5" → "5"
_BRACED_POWER = re.compile(r"\^\{(\w)\}")  # x^{2} → x^2


def math_answer(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """1.0 when the response's final answer equals the reference's (as numbers, else as normalised text),
    else 0.0 — the GSM8K/MATH-style RLVR check. ValueError (TypeError) on a reference it cannot read."""
    scores = []
    for response, meta in zip(responses, metadata):
        reference = reference_answer(_reference_value(meta))
        scores.append(float(same_answer(final_answer(response), reference)))
    return scores


def reference_answer(value: object) -> str:
    """The final answer a reference holds: after GSM8K's last `####`, in MATH's last `\\boxed{}`, after
    "answer is", or the whole reference when it is a plain number or short string.
    ValueError naming the reference when it holds none of these."""
    text = _reference_text(value)
    if "####" in text:
        if answer := _after_hashes(text):
            return answer
        raise _unreadable(text, "nothing follows its '####'")
    if _BOXED.search(text):
        if answer := _last_boxed(text):
            return answer
        raise _unreadable(text, "its \\boxed{} is empty or never closed")
    if answer := _answer_is(text):
        return answer
    if _is_plain(text):
        return text
    raise _unreadable(text, "no '#### <answer>', no \\boxed{...}, no 'answer is', and not a plain answer "
                            "(more than three words, several lines, or an '=' among words)")


def final_answer(text: str) -> str | None:
    """The response's answer: its last complete `\\boxed{}`, else its last `#### x`, else what follows its
    last "answer is", else its last number; None when it has none (scored 0.0: the response is wrong)."""
    text = text.replace("\u2212", "-")  # Unicode minus
    for extract in (_last_boxed, _after_hashes, _answer_is, _last_number):
        if answer := extract(text):
            return answer
    return None


def same_answer(answer: str | None, reference: str) -> bool:
    """Whether two final answers agree: as exact rationals when both are numbers, else as normalised text."""
    if answer is None:
        return False
    answer, reference = normalise_answer(answer), normalise_answer(reference)
    a, r = _number(answer), _number(reference)
    if a is not None and r is not None:
        return a == r
    return _squash(answer) == _squash(reference)


def normalise_answer(text: str) -> str:
    """`text` without what does not change a final answer: math delimiters, `$`, `\\text{}`, `\\left`/`\\right`,
    spacing macros, degrees, `%`, a trailing `.`, a leading `x =`; `\\dfrac`/`\\tfrac` as `\\frac`."""
    s = _DELIMITERS.sub("", text.replace("\u2212", "-"))
    for _ in range(2):  # \text{\textbf{…}}
        s = _TEXT_MACRO.sub(r" \1 ", s)
    s = _LEFT_RIGHT.sub("", s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    s = _SPACING.sub(" ", _DIGIT_GROUP.sub(",", s))
    s = _PERCENT.sub("", _DEGREES.sub("", s))
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", _FRAC_SHORT.sub(_braced_frac, s))
    s = " ".join(s.split()).rstrip(".").strip()
    if assignment := _ASSIGNMENT.fullmatch(s):
        s = assignment[1]
    return s


# ---- references ----------------------------------------------------------------------------


def _reference_value(meta: dict) -> object:
    for key in REFERENCE_KEYS:
        if meta.get(key) is not None:
            return meta[key]
    raise ValueError(f"no reference answer: the row has no non-null {' or '.join(map(repr, REFERENCE_KEYS))} "
                     f"column (its columns besides the prompt: {sorted(meta)}); name the reference column 'answer'")


def _reference_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"reference answer {_show(value)} is a {type(value).__name__}, not a number or string")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"reference answer {value} is not a finite number")
        return format(Decimal(repr(value)), "f")  # 1e-07 → 0.0000001
    if not str(value).strip():
        raise ValueError("reference answer is empty")
    return str(value).strip()


def _is_plain(text: str) -> bool:
    """A one-line answer, not a worked solution: at most three words, and no `=` among words."""
    words = _PROSE_WORD.findall(text)
    return "\n" not in text and len(words) <= 3 and not (words and "=" in text)


def _unreadable(text: str, why: str) -> ValueError:
    return ValueError(f"cannot read the reference answer {_show(text)}: {why}. Expected a GSM8K-style "
                      "'#### <answer>', a MATH-style '\\boxed{...}', or a plain number or short string")


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


# ---- answer extraction ---------------------------------------------------------------------


def _after_hashes(text: str) -> str | None:
    """The rest of the line after the last `####` (GSM8K's answer marker)."""
    if "####" not in text:
        return None
    rest = text.rpartition("####")[2].strip()
    return rest.split("\n", 1)[0].strip() or None


def _last_boxed(text: str) -> str | None:
    """The content of the last complete, non-empty `\\boxed{...}` (or `\\fbox`, or `\\boxed 5`)."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    closing = _closing_braces(text) if starts else {}
    for start in reversed(starts):
        if start in closing:
            content = text[start + 1 : closing[start]]
        elif token := _TOKEN.match(text, start):
            content = token[0]
        else:
            continue  # a group never closed: the response was cut off there
        if content.strip():
            return content.strip()
    return None


def _closing_braces(text: str) -> dict[int, int]:
    """{index of each `{`: index of the `}` closing it}, escaped braces skipped; one pass, so a response
    repeating `\\boxed{` thousands of times stays linear."""
    closing, open_at = {}, []
    for match in _BRACE_OR_ESCAPE.finditer(text):
        if match[0] == "{":
            open_at.append(match.start())
        elif match[0] == "}" and open_at:
            closing[open_at.pop()] = match.start()
    return closing


def _answer_is(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" up to the end of that sentence; only its leading
    number when the rest is explanation ("72 clips because …" → "72"); None when that is prose."""
    said = list(_ANSWER_IS.finditer(text))
    if not said:
        return None
    line = text[said[-1].end() :].split("\n", 1)[0]
    span = _SENTENCE_END.split(line, 1)[0].strip()
    if _number(normalise_answer(span)) is None and (lead := _LEADING_NUMBER.match(span)):
        return lead[1]
    return span if span and _is_plain(span) else None  # "Answer: let me think …" says no answer


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_IN_TEXT.findall(text)
    return numbers[-1] if numbers else None


# ---- comparison ----------------------------------------------------------------------------


def _number(s: str) -> Fraction | None:
    """The value of a normalised answer that is a number (with at most a trailing unit), else None."""
    value = _plain_number(s)
    unit = _WITH_UNIT.fullmatch(s) if value is None else None
    if unit and not _NOT_UNITS & set(unit[2].lower().split()):
        value = _plain_number(unit[1])
    attached = _ATTACHED_UNIT.fullmatch(s) if value is None else None
    if attached and attached[1][-1].isdigit():
        value = _plain_number(attached[1])
    return value


def _plain_number(s: str) -> Fraction | None:
    if len(s) > _MAX_NUMBER_CHARS or re.search(r"\d\s+\d", s):  # "1 2" is two numbers
        return None
    s = "".join(s.split())
    if _SIGNED.fullmatch(s):
        return Fraction(s.replace(",", ""))
    ratio = _RATIO.fullmatch(s) or _LATEX_FRAC.fullmatch(s)
    if not ratio:
        return None
    numerator, denominator = (Fraction(part.replace(",", "")) for part in ratio.group(2, 3))
    if denominator == 0:
        return None
    return (-1 if ratio[1] == "-" else 1) * numerator / denominator


def _squash(s: str) -> str:
    return _BRACED_POWER.sub(r"^\1", "".join(s.split())).lower()


def _braced_frac(match: re.Match) -> str:
    return "\\frac" + "".join(arg if arg.startswith("{") else "{" + arg + "}" for arg in match.groups())
