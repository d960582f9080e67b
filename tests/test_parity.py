"""TP = PP = 1 (in-process): our megatron models give transformers' logits."""

import pytest

from ark_mega.models import preset
from parity import TOL, parity


@pytest.mark.parametrize("name", ["tiny_ark_asr", "tiny_qwen3_asr"])
def test_parity_single_rank(single_rank, name):
    errors = parity(preset(name))
    assert set(errors) == {"padded", "packed"}
    assert all(e <= TOL for e in errors.values()), errors
