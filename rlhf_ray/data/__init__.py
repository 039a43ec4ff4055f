"""Data: rows from files or the hub → typed tokenized examples → seeded batches → padded tensors.

- `sources.py`  `load_rows`: JSONL / JSON / Parquet files, shard directories, hub ids; row origins
- `errors.py`   `DataError`: names file, row, key and reason
- `records.py`  example records and one loader per format (prompts, SFT, preferences, ranked, KTO);
                TRL's dataset types detected from the columns
- `conversations.py` HH-RLHF transcripts → messages, implicit prompts, multi-turn assistant masks
- `iterator.py` `BatchIterator`: seeded, resumable index batches over epochs
- `feedback.py` feedback records (comparisons, ratings, thumbs, edits, critiques) → training datasets
- `constitution.py` Constitutional AI principles and the critique / revision conversations
- `collate.py`  left/right padding, prompt+response batches with a response mask, K candidates per prompt
"""

from rlhf_ray.data.collate import concat_prompt_response, pad_candidates, pad_left, pad_right
from rlhf_ray.data.conversations import transcript_messages
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.iterator import BatchIterator
from rlhf_ray.data.records import (
    Keys,
    KTOExample,
    LoadReport,
    PreferenceExample,
    PromptExample,
    RankedExample,
    SFTExample,
    load_kto,
    load_preferences,
    load_prompts,
    load_ranked,
    load_sft,
    render_messages,
)
from rlhf_ray.data.sources import ORIGIN_FILE, ORIGIN_ROW, load_rows

__all__ = [
    "ORIGIN_FILE",
    "ORIGIN_ROW",
    "BatchIterator",
    "DataError",
    "KTOExample",
    "Keys",
    "LoadReport",
    "PreferenceExample",
    "PromptExample",
    "RankedExample",
    "SFTExample",
    "concat_prompt_response",
    "load_kto",
    "load_preferences",
    "load_prompts",
    "load_ranked",
    "load_rows",
    "load_sft",
    "pad_candidates",
    "pad_left",
    "pad_right",
    "render_messages",
    "transcript_messages",
]
