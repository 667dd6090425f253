import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


PYTHIA_TOKENIZER_DIR = os.path.join(ROOT, "tests", "data", "pythia_tokenizer")


@pytest.fixture(scope="session")
def pythia_tokenizer_dir():
    """Pythia's own tokenizer files (GPT-NeoX-20B BPE, Apache-2.0; see the NOTICE.md beside them), vendored so the
    real data path is tested with Pythia's tokenization without any download. Read-only: load it, never save into it."""
    return PYTHIA_TOKENIZER_DIR

